"""label-many deletes only what it made, and refuses outputs among its inputs (no Ray: planning and staging)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from unet_perception.fleet.plan import REPORT_NAME, expand_inputs, plan_jobs
from unet_perception.fleet.staging import LOCK_NAME, attempt_folder, run_folder
from unet_perception.tools.bag import BagError
from unet_perception.tools.bag_cli import main

pytestmark = pytest.mark.fleet
# Names a bag may have; run1 first, the two whose glob matches run1 last. ("?" works in planning but not yet in
# sqlite3 bags: rosbags opens them through a URI, where "?" ends the path; see /work/wt/notes/FOR_BAGS_from_fleet.md.)
HOSTILE = ("run1", "ünï 日本", "a b *", "[!r]un1", "run[1]", "r*n1")


def killed_run(out: Path) -> Path:
    """A label-many run on ``out`` that is SIGKILLed mid-bag (a real process, the real staging code); returns the
    partial folder it left."""
    code = ("import os, signal, sys\nfrom pathlib import Path\nfrom unet_perception.fleet.staging import run_folder\n"
            "with run_folder(Path(sys.argv[1])) as run:\n"
            "    bag = run / '0' / 'attempt-1' / 'run1'\n"
            "    bag.mkdir(parents=True)\n"
            "    (bag / 'run1.db3').write_bytes(bytes(4096))\n"
            "    print(run.name, flush=True)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    run = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=300,
                         check=False)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    partial = out / run.stdout.strip()
    assert (partial / "0" / "attempt-1" / "run1" / "run1.db3").is_file()
    return partial


def _decoys(out: Path) -> list[Path]:
    """Hidden folders in ``out`` that no run of this output made: an older tool's work folder of ``run1``, a run
    folder that no lock names, a bag's own staging folder."""
    decoys = [out / ".run1.labelling-abc123", out / f".label-many.partial-{'0' * 32}", out / ".run[1].partial-x"]
    for path in decoys:
        path.mkdir(parents=True)
        (path / "keep").write_text("not label-many's")
    return decoys


def test_a_killed_runs_folder_is_removed_by_the_next_run_and_nothing_else(tmp_path: Path) -> None:
    out = tmp_path / "out"
    partial = killed_run(out)
    decoys = _decoys(out)
    with run_folder(out) as run:
        assert not partial.exists(), "the killed run's partial folder survived the next run's start"
        assert run.parent == out and run != partial and run.is_dir()
        work = attempt_folder(run / "0", 1)
        (work / "x").write_text("attempt 1 of bag 0, whose worker died")
        second = attempt_folder(run / "0", 2)
        assert not work.exists() and second.is_dir()  # the earlier attempt, by its exact name
    assert all((d / "keep").read_text() == "not label-many's" for d in decoys)
    assert sorted(p.name for p in out.iterdir()) == sorted(d.name for d in decoys)  # lock and run folder gone


def test_a_second_run_on_the_same_output_is_refused_while_one_works(tmp_path: Path) -> None:
    with run_folder(tmp_path / "out") as run:
        with pytest.raises(BagError, match=f"another label-many run is writing into {tmp_path / 'out'}"):
            with run_folder(tmp_path / "out"):
                pass
        assert run.is_dir()  # the refused run touched nothing of the working one
    assert list((tmp_path / "out").iterdir()) == []


def test_a_lock_that_is_a_symlink_or_names_something_else_is_not_followed(tmp_path: Path) -> None:
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (elsewhere / "precious").write_text("x")
    (out / LOCK_NAME).symlink_to(elsewhere / "precious")
    with pytest.raises(BagError, match="cannot open .*lock"):
        with run_folder(out):
            pass
    (out / LOCK_NAME).unlink()
    (out / "mine").mkdir()
    (out / LOCK_NAME).write_text("mine\n")  # not a name staging makes: left alone
    with run_folder(out):
        pass
    assert (out / "mine").is_dir() and (elsewhere / "precious").read_text() == "x"


def test_out_equal_to_or_inside_an_input_is_refused(tmp_path: Path, tiny_model: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    bags = tmp_path / "bags"
    for name in ("a", "b"):
        (bags / name).mkdir(parents=True)
    with pytest.raises(BagError, match=f"the input {bags / 'a'} is --out"):
        expand_inputs([str(bags / "a"), str(bags / "b")], out_dir=bags / "a")
    with pytest.raises(BagError, match=f"--out {bags / 'a' / 'labelled'} is inside the input bag {bags / 'a'}"):
        expand_inputs([str(bags / "*")], out_dir=bags / "a" / "labelled")
    (bags / "b" / "old").mkdir()
    with pytest.raises(BagError, match=f"the input {bags / 'b' / 'old'} is inside --out"):
        expand_inputs([str(bags / "a"), str(bags / "b" / "old")], out_dir=bags / "b")
    # what a glob matches of the output folder is earlier output, not an input
    assert expand_inputs([str(bags / "*")], out_dir=bags / "b") == [bags / "a"]

    # through the command line: one line, exit 1, nothing made
    code = main(["label-many", str(bags / "a"), str(bags / "b"), "--out", str(bags / "b"),
                 "--model", str(tiny_model)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and err.startswith("unet-bag label-many: error: the input"), err
    assert sorted(p.name for p in bags.iterdir()) == ["a", "b"] and sorted(p.name for p in (bags / "b").iterdir()) \
        == ["old"]


def test_bags_named_like_the_runs_own_files_are_refused_before_any_work(tmp_path: Path) -> None:
    for name in (REPORT_NAME, LOCK_NAME, f".label-many.partial-{'a' * 32}"):
        (tmp_path / "bags" / name).mkdir(parents=True)
        with pytest.raises(BagError, match=f"would be written to .*{name}, which is the run's own"):
            plan_jobs([tmp_path / "bags" / name], tmp_path / "out")
    (tmp_path / "bags" / f"{REPORT_NAME}.mcap").write_bytes(b"")
    with pytest.raises(BagError, match="which is the run's own report; rename the bag"):
        plan_jobs([tmp_path / "bags" / f"{REPORT_NAME}.mcap"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_names_with_glob_characters_spaces_and_unicode_are_taken_literally(tmp_path: Path) -> None:
    bags = tmp_path / "bags"
    names = (*HOSTILE, "r?n1", "#%41")
    for name in names:
        (bags / name).mkdir(parents=True)
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"bags/{name}\n" for name in reversed(HOSTILE)))
    assert expand_inputs([str(bags / "run[1]")]) == [bags / "run[1]"]  # the bag, not the pattern (run1)
    assert [p.name for p in expand_inputs([str(listing)])] == list(reversed(HOSTILE))
    jobs = plan_jobs(expand_inputs([str(bags / n) for n in names]), tmp_path / "out")
    assert [j.out.name for j in jobs] == list(names)
    # a listed name with "#" is that bag, even beside the bag its part before the "#" names; comments still work
    (bags / "a").mkdir()
    (bags / "a #2").mkdir()
    listing.write_text("# the list\nbags/a #2\nbags/#%41\nbags/run1  # the long one\n")
    assert [p.name for p in expand_inputs([str(listing)])] == ["a #2", "#%41", "run1"]


def test_an_error_that_spans_lines_is_printed_on_one(tmp_path: Path, tiny_model: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A metadata.yaml that does not parse: the YAML error spans lines; unet-bag prints it on one."""
    import cv2
    import numpy as np

    from unet_perception.tools.bag import bag_from_images

    (tmp_path / "img").mkdir()
    cv2.imwrite(str(tmp_path / "img" / "0.png"), np.zeros((8, 8, 3), np.uint8))
    bag_from_images([tmp_path / "img" / "0.png"], tmp_path / "garbled", progress=False)
    meta = tmp_path / "garbled" / "metadata.yaml"
    meta.write_text(meta.read_text().replace("rosbag2_bagfile_information:", "rosbag2_bagfile_information:\n  : [", 1))
    code = main(["label", str(tmp_path / "garbled"), str(tmp_path / "out"), "--model", str(tiny_model)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "metadata.yaml" in err and "line 2" in err, err
    assert not (tmp_path / "out").exists()


def test_names_that_are_not_utf8_are_refused_in_one_printable_line(tmp_path: Path, tiny_model: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Ray cannot start a driver whose arguments are not UTF-8 (it failed with a UnicodeEncodeError traceback), so
    such a bag is refused first; its name, a list file's bad line and an ANSI escape print as escapes."""
    import os

    bad = Path(os.fsdecode(bytes(tmp_path / "bags") + b"/b\xff\x1b[31m"))
    bad.mkdir(parents=True)
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"bags/\xfe\x1b[2J\n")
    for inputs in ([str(bad)], [str(listing)]):
        code = main(["label-many", *inputs, "--out", str(tmp_path / "out"), "--model", str(tiny_model)])
        err = capsys.readouterr().err
        assert code == 1 and err.count("\n") == 1 and err[:-1].isprintable(), err
        assert "\\udcff\\x1b[31m" in err or "\\udcfe\\x1b[2J" in err, err
    assert not (tmp_path / "out").exists()


def test_an_sqlite3_output_folder_with_uri_characters_is_refused_before_ray(tmp_path: Path, tiny_model: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """rosbags opens sqlite3 files through a URI: each bag's output under 'out?1' would fail (or, for 'label',
    lose its .db3), so the run is refused in one line before Ray starts; MCAP outputs may go there."""
    import cv2
    import numpy as np

    from unet_perception.tools.bag import bag_from_images

    image = tmp_path / "f.png"
    cv2.imwrite(str(image), np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "bags").mkdir()
    bag_from_images([image], tmp_path / "bags" / "a", storage="sqlite3", progress=False)
    for out, storage in ((tmp_path / "out?1", []), (tmp_path / "o#t", ["--storage", "sqlite3"])):
        code = main(["label-many", str(tmp_path / "bags" / "a"), "--out", str(out), "--model", str(tiny_model),
                     *storage])
        err = capsys.readouterr().err
        assert code == 1 and err.count("\n") == 1 and "--storage mcap" in err and "Traceback" not in err, err
        assert not out.exists()
