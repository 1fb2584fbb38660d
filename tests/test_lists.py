"""List-file parsing: every problem reported with file:line, segments, data_root, round trip."""

import os

import pytest

from pipelines.lists import ListFileError, VideoRecord, read_list, write_list


def _touch(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb"):
        pass


def _write(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return str(path)


@pytest.fixture
def root(tmp_path):
    for name in ("a.mp4", "b.mp4", "sub/c.webm"):
        _touch(str(tmp_path / "videos" / name))
    return tmp_path


def test_two_and_four_field_lines_with_comments_and_blank_lines(root):
    list_path = _write(
        root / "list.txt",
        "# a comment\n"
        "videos/a.mp4 0\n"
        "\n"
        "   \n"
        "videos/sub/c.webm 3 1.5 4.25\n"
        "#videos/missing.mp4 1\n"
        "videos/b.mp4 1\r\n",
    )
    records = read_list(list_path, data_root=str(root), num_classes=4)
    assert [r.label for r in records] == [0, 3, 1]
    assert records[0] == VideoRecord(
        os.path.join(str(root), "videos/a.mp4"), 0, None, None, f"{list_path}:2"
    )
    assert (records[1].start_sec, records[1].end_sec) == (1.5, 4.25)
    assert records[1].source == f"{list_path}:5"
    assert records[2].start_sec is None and records[2].end_sec is None


def test_data_root_join_keeps_absolute_paths(root):
    absolute = str(root / "videos" / "b.mp4")
    list_path = _write(root / "list.txt", f"a.mp4 0\n{absolute} 1\n")
    records = read_list(list_path, data_root=str(root / "videos"))
    assert [r.path for r in records] == [str(root / "videos" / "a.mp4"), absolute]


def test_without_data_root_paths_are_kept_as_written(tmp_path):
    list_path = _write(tmp_path / "list.txt", "x/y.mp4 2\n")
    assert read_list(list_path, check_files=False)[0].path == "x/y.mp4"


@pytest.mark.parametrize(
    "line, fragment",
    [
        ("videos/a.mp4", "got 1 field"),
        ("videos/a.mp4 1 2", "got 3 fields (paths may not contain spaces)"),
        ("my video.mp4 1 2.0 3.0 4", "got 6 fields (paths may not contain spaces)"),
        ("videos/a.mp4 one", "label 'one' is not an integer"),
        ("videos/a.mp4 1.0", "label '1.0' is not an integer"),
        ("videos/a.mp4 -1", "label -1 outside [0, 4)"),
        ("videos/a.mp4 4", "label 4 outside [0, 4)"),
        ("videos/a.mp4 1 x 3", "start_sec 'x' is not a number"),
        ("videos/a.mp4 1 2 y", "end_sec 'y' is not a number"),
        ("videos/a.mp4 1 -2 3", "start_sec -2 is negative"),
        ("videos/a.mp4 1 5 3", "end_sec 3 is not after start_sec 5"),
        ("videos/a.mp4 1 3 3", "end_sec 3 is not after start_sec 3"),
        ("videos/a.mp4 1 nan 3", "is not a finite number"),
        ("videos/missing.mp4 1", "file not found"),
    ],
)
def test_each_problem_is_reported_with_file_and_line(root, line, fragment):
    list_path = _write(root / "list.txt", f"videos/a.mp4 0\n# comment\n{line}\n")
    with pytest.raises(ListFileError) as info:
        read_list(list_path, data_root=str(root), num_classes=4)
    message = str(info.value)
    assert f"{list_path}:3: " in message
    assert fragment in message
    assert "1 problem in total" in message
    assert isinstance(info.value, ValueError)


def test_missing_file_message_names_the_resolved_path(root):
    list_path = _write(root / "list.txt", "videos/a.mp4 0\nvideos/gone.mp4 1\n")
    with pytest.raises(ListFileError) as info:
        read_list(list_path, data_root=str(root))
    assert f"{list_path}:2: file not found ({os.path.join(str(root), 'videos/gone.mp4')})" in str(
        info.value
    )
    # The same list is fine when files are not checked.
    assert len(read_list(list_path, data_root=str(root), check_files=False)) == 2


def test_labels_unchecked_above_without_num_classes(root):
    list_path = _write(root / "list.txt", "videos/a.mp4 999\n")
    assert read_list(list_path, data_root=str(root))[0].label == 999


def test_many_problems_show_twenty_and_the_total(root):
    bad = "".join(f"videos/a.mp4 bad{i}\n" for i in range(25))
    list_path = _write(root / "list.txt", "videos/a.mp4 0\n" + bad)
    with pytest.raises(ListFileError) as info:
        read_list(list_path, data_root=str(root))
    message = str(info.value)
    assert len(info.value.problems) == 25
    assert f"{list_path}:21: label 'bad19'" in message  # the 20th problem is shown
    assert "bad20" not in message  # the 21st is not
    assert message.splitlines()[-1] == "... and 5 more; 25 problems in total"


def test_all_problems_are_collected_across_kinds(root):
    list_path = _write(
        root / "list.txt", "videos/a.mp4 x\nvideos/gone.mp4 1\nvideos/b.mp4 1 4 2\n"
    )
    with pytest.raises(ListFileError) as info:
        read_list(list_path, data_root=str(root))
    assert [p.split(": ")[0] for p in info.value.problems] == [
        f"{list_path}:1",
        f"{list_path}:2",
        f"{list_path}:3",
    ]


def test_missing_list_file_raises_file_not_found(tmp_path):
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_list(missing)


def test_list_without_records_is_an_error(tmp_path):
    list_path = _write(tmp_path / "list.txt", "# only a comment\n\n")
    with pytest.raises(ListFileError, match="no records"):
        read_list(list_path)


def test_write_then_read_round_trip(root):
    records = [
        VideoRecord("videos/a.mp4", 0),
        VideoRecord("videos/sub/c.webm", 2, 0.1, 12.345678901),
        VideoRecord("videos/b.mp4", 1, 0.0, 3.0),
    ]
    list_path = str(root / "out.txt")
    write_list(list_path, records)
    back = read_list(list_path, data_root=str(root))
    assert [(os.path.relpath(r.path, str(root)), r.label, r.start_sec, r.end_sec) for r in back] == [
        (r.path, r.label, r.start_sec, r.end_sec) for r in records
    ]
    assert not [n for n in os.listdir(str(root)) if n.startswith(".tmp-")]
    assert oct(os.stat(list_path).st_mode & 0o777) != oct(0o600)


def test_write_relative_to_data_root_and_overwrite(root):
    records = [VideoRecord(str(root / "videos" / "a.mp4"), 3)]
    list_path = str(root / "out.txt")
    _write(list_path, "old content that must go\n")
    write_list(list_path, records, data_root=str(root))
    with open(list_path, encoding="utf-8") as f:
        assert f.read() == "videos/a.mp4 3\n"


def test_write_rejects_paths_with_spaces(tmp_path):
    with pytest.raises(ValueError, match="spaces"):
        write_list(str(tmp_path / "out.txt"), [VideoRecord("my video.mp4", 0)])
    assert not os.path.exists(tmp_path / "out.txt")


def test_a_byte_order_mark_is_not_part_of_the_first_path(root):
    """Editors on Windows start UTF-8 files with a BOM: it read as "file not found" for a path
    that looked right."""
    path = root / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfvideos/a.mp4 0\r\nvideos/b.mp4 1\r\n")
    records = read_list(str(path), data_root=str(root))
    assert [os.path.basename(r.path) for r in records] == ["a.mp4", "b.mp4"]


def test_bytes_that_are_not_utf8_are_named_with_file_and_line(root):
    path = root / "latin1.txt"
    path.write_bytes(b"videos/a.mp4 0\nvideos/caf\xe9.mp4 1\n")
    with pytest.raises(ListFileError) as e:
        read_list(str(path), data_root=str(root))
    assert f"{path}:2: not UTF-8 text (byte 0xe9 at column 11)" in str(e.value)
