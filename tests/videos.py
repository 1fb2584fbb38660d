"""Synthetic test videos written with PyAV, for the reader and probe tests.

Every frame carries its own number: with ``pattern="bars"`` the frame is cut into 8 vertical
bars, bar b white when bit b of the frame number is set, so ``frame_number`` can read it back
from a lossy decode (wide flat regions survive H.264/VP9 at any sane quality). Exact checks do
not rely on this: the tests compare against a full sequential decode of the same file.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction

import av
import numpy as np

NUM_BARS = 8


def frame_image(i: int, size: tuple[int, int], pattern: str = "bars") -> np.ndarray:
    """The RGB image ``[H, W, 3]`` uint8 written as frame number ``i``."""
    width, height = size
    img = np.empty((height, width, 3), np.uint8)
    if pattern == "bars":
        bar = width // NUM_BARS
        # A faint frame-dependent tint keeps consecutive frames different in every bar.
        img[:] = (40 + (i * 7) % 50, 60, 80)
        for b in range(NUM_BARS):
            if (i >> b) & 1:
                img[:, b * bar : (b + 1) * bar] = 230
    elif pattern == "field":
        img[:] = ((i * 37) % 256, (i * 91 + 60) % 256, (i * 53 + 120) % 256)
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    return img


def frame_number(rgb: np.ndarray) -> int:
    """Reads back the number of a decoded ``pattern="bars"`` frame."""
    width = rgb.shape[1]
    bar = width // NUM_BARS
    luma = rgb.mean(axis=(0, 2))
    # The middle half of each bar: edges blur under lossy coding.
    inner = [luma[b * bar + bar // 4 : (b + 1) * bar - bar // 4].mean() for b in range(NUM_BARS)]
    return sum(1 << b for b, level in enumerate(inner) if level > 160)


def write_video(
    path: str,
    num_frames: int,
    *,
    codec: str = "libx264",
    size: tuple[int, int] = (96, 64),
    fps: int = 25,
    gop: int = 12,
    bframes: int = 0,
    open_gop: bool = False,
    start_pts: int = 0,
    pattern: str = "bars",
    pts: Sequence[int] | None = None,
    audio: bool = False,
    options: dict[str, str] | None = None,
    container_options: dict[str, str] | None = None,
) -> str:
    """Writes ``num_frames`` numbered frames to ``path`` (container from the extension).

    ``start_pts`` offsets every pts (in frames, time base 1/fps): a positive value gives a
    non-zero start timestamp, a negative one makes the mp4 muxer write an edit list that hides
    the frames with negative pts.
    """
    with av.open(path, mode="w", options=container_options or {}) as container:
        sound = container.add_stream("aac", rate=8000) if audio else None
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = Fraction(1, fps)
        stream.codec_context.gop_size = gop
        opts = {}
        if codec == "libx264":
            x264 = [f"keyint={gop}", f"min-keyint={gop}", "scenecut=0", f"bframes={bframes}"]
            if bframes:
                x264.append("b-adapt=0")  # fixed B-frame runs, so GOP layouts are predictable
            if open_gop:
                x264.append("open-gop=1")
            opts = {"bf": str(bframes), "x264-params": ":".join(x264), "preset": "veryfast",
                    "crf": "23"}
        elif codec == "libvpx-vp9":
            # This libvpx makes no hidden alt-ref frames even when asked (auto-alt-ref, lag,
            # good deadline): every packet is one shown frame.
            opts = {"g": str(gop), "keyint_min": str(gop), "deadline": "realtime", "cpu-used": "8",
                    "crf": "30", "b:v": "0"}
        opts.update(options or {})
        stream.options = opts
        container.start_encoding()  # so that even zero frames make a file with a header
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(frame_image(i, size, pattern), format="rgb24")
            frame.pts = start_pts + (i if pts is None else pts[i])
            frame.time_base = Fraction(1, fps)
            container.mux(stream.encode(frame))
            if sound is not None:
                silence = np.zeros((1, 320), np.float32)
                samples = av.AudioFrame.from_ndarray(silence, format="fltp", layout="mono")
                samples.sample_rate, samples.pts = 8000, i * 320
                container.mux(sound.encode(samples))
        container.mux(stream.encode(None))
        if sound is not None:
            container.mux(sound.encode(None))
    return path


def encode_frames(path: str, frames: np.ndarray, encoder: str = "libvpx-vp9", *, pix_fmt: str = "yuv420p",
                  options: dict[str, str] | None = None, gop: int | None = None) -> str:
    """Encodes RGB ``frames`` ``[T, H, W, 3]`` uint8 at 25 fps, converted to ``pix_fmt``."""
    with av.open(path, "w") as container:
        stream = container.add_stream(encoder, rate=25, options=dict(options or {}))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        if gop is not None:
            stream.codec_context.gop_size = gop
        for t, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, 25)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def decode_all(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Decodes every frame from the start: ``(pts sorted, frames [N, H, W, 3])``."""
    with av.open(path) as container:
        frames = [(f.pts, f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]
    if all(p is not None for p, _ in frames):  # files without pts stay in output order
        frames.sort(key=lambda item: item[0])
    return np.array([p for p, _ in frames]), np.stack([f for _, f in frames])


def photo_frames(num_frames: int, height: int, width: int) -> np.ndarray:
    """Natural frames ``[T, H, W, 3]`` uint8: a slow pan and zoom over a photograph (Grace Hopper,
    shipped with matplotlib), for comparing image ops where synthetic patterns would flatter."""
    import matplotlib.cbook
    from PIL import Image

    photo = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    zoom = min(1.4, (photo.width - 1) / width, (photo.height - 1) / height)  # the box stays in the photo
    room_x, room_y = photo.width - int(width * zoom), photo.height - int(height * zoom)
    frames = []
    for t in range(num_frames):
        left, top = (10 + 7 * t) % room_x, (20 + 5 * t) % room_y
        box = (left, top, left + int(width * zoom), top + int(height * zoom))
        frames.append(np.asarray(photo.crop(box).resize((width, height), Image.BILINEAR)))
    return np.stack(frames)


def remux_with_pts(src: str, dst: str, pts: dict[int, int]) -> str:
    """Copies ``src``'s video packets to ``dst`` (mkv or webm, which keep pts only), giving packet
    ``i`` (demux order) the pts ``pts[i]`` (in ``src``'s time base): how a muxer's bug looks."""
    with av.open(src) as source, av.open(dst, "w") as target:
        stream = source.streams.video[0]
        out = target.add_stream_from_template(stream)
        for i, packet in enumerate(p for p in source.demux(stream) if p.size):
            packet.pts = pts.get(i, packet.pts)
            packet.dts = i  # monotonic and never above a pts; matroska stores pts only
            packet.stream = out
            target.mux(packet)
    return dst
