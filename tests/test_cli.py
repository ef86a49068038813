"""The `mgjax` command: success prints the prediction, bad input exits 2 with a one-line reason."""

import json

import numpy as np

from mgjax.cli import main
from helpers import GOLDEN

CASE = GOLDEN / "llama_vicuna"


def test_predict_prints_the_originals_first_token(capsys):
    assert main(["predict", str(CASE / "MGM-7B-tiny"), "--image", str(CASE / "input.jpg"), "--top-k", "3"]) == 0
    out = capsys.readouterr().out
    first = int(np.load(CASE / "expected.npz")["generate_ids"][0, 0])
    assert out.splitlines()[3].split()[0] == str(first)  # the top line of "next token:"
    assert json.loads((CASE / "case.json").read_text())["prompt"] in out.replace("\\n", "\n")


def test_bad_image_exits_2(tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    assert main(["predict", str(CASE / "MGM-7B-tiny"), "--image", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mgjax predict: error:") and str(bad) in err and "\n" not in err


def test_missing_checkpoint_exits_2(tmp_path, capsys):
    assert main(["predict", str(tmp_path / "nope"), "--image", str(CASE / "input.jpg")]) == 2
    assert "checkpoint folder not found" in capsys.readouterr().err


def test_every_flag_has_help():
    import argparse

    from mgjax.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"predict", "convert", "export", "plan", "check-cluster"} <= set(commands.choices)
    for name, sub in commands.choices.items():
        for action in sub._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"mgjax {name} {action.option_strings or action.dest} has no help text"


def test_python_m_mgjax_is_the_command():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "mgjax", "predict", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--template" in out.stdout and "--image" in out.stdout
    out = subprocess.run([sys.executable, "-m", "mgjax", "plan", "MGM-70B"], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "'MGM-70B' is neither a preset" in out.stderr


def test_usage_errors_are_one_line(capsys):
    import pytest

    for argv, culprit in ((["predict", "x", "--image", "y", "--top-k", "0"], "--top-k"),
                          (["predict", "x", "--image", "y", "--template", "llama3"], "--template"),
                          (["plan", "MGM-7B", "--devices", "abc"], "--devices")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and culprit in err, err


def test_predict_checks_image_and_tokenizer_before_the_weights(tmp_path, capsys, monkeypatch):
    import shutil

    import mgjax

    def no_load(*a, **k):
        raise AssertionError("weights loaded before the cheap checks")

    monkeypatch.setattr(mgjax, "load_pretrained", no_load)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    assert main(["predict", str(CASE / "MGM-7B-tiny"), "--image", str(bad)]) == 2
    assert str(bad) in capsys.readouterr().err
    no_tok = tmp_path / "MGM-7B"
    shutil.copytree(CASE / "MGM-7B-tiny", no_tok, ignore=shutil.ignore_patterns("tokenizer*"))
    assert main(["predict", str(no_tok), "--image", str(CASE / "input.jpg")]) == 2
    assert "no tokenizer files" in capsys.readouterr().err


def test_predict_with_an_explicit_template(capsys):
    assert main(["predict", str(CASE / "MGM-7B-tiny"), "--image", str(CASE / "input.jpg"), "--top-k", "1",
                 "--template", "chatml_direct"]) == 0
    out = capsys.readouterr().out
    assert "template chatml_direct (template= argument)" in out and "<|im_start|>user" in out


def test_malformed_distributed_environment_exits_2(monkeypatch, capsys):
    for env, culprit in (({"MGJAX_NUM_PROCESSES": "abc", "MGJAX_PROCESS_ID": "0", "MGJAX_COORDINATOR": "h:1"},
                          "MGJAX_NUM_PROCESSES='abc'"),
                         ({"MGJAX_NUM_PROCESSES": "2", "MGJAX_PROCESS_ID": "2", "MGJAX_COORDINATOR": "h:1"},
                          "process id 2"),
                         ({"MGJAX_NUM_PROCESSES": "2", "MGJAX_PROCESS_ID": "-1", "MGJAX_COORDINATOR": "h:1"},
                          "MGJAX_PROCESS_ID='-1' is not an integer >= 0"),
                         ({"MGJAX_NUM_PROCESSES": "2", "MGJAX_PROCESS_ID": "0", "MGJAX_COORDINATOR": "h"},
                          "must be HOST:PORT")):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        assert main(["check-cluster"]) == 2
        err = capsys.readouterr().err
        assert culprit in err and err.count("\n") == 1, err


def test_export_refuses_a_zero_shard_size(capsys):
    import pytest

    with pytest.raises(SystemExit) as e:
        main(["export", "a", "b", "--max-shard-gb", "0"])
    assert e.value.code == 2 and "--max-shard-gb" in capsys.readouterr().err


def test_tpu_pod_help():
    import subprocess
    from pathlib import Path

    out = subprocess.run(["bash", str(Path(__file__).parent.parent / "launch" / "tpu_pod.sh"), "--help"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "--name" in out.stdout and "--zone" in out.stdout


def test_a_signal_dropped_in_a_finalizer_is_quiet_and_raised_at_the_commit_point():
    """SIGTERM that lands while Python runs a finalizer (JAX's gc callback, say: seen when `mgjax export`
    was terminated) is dropped by Python with a report on stderr; under `interrupt.handled()` the report is
    silenced (the command ends with its one line) and `check()` raises the signal before anything is made
    final. In a child process: pytest replaces Python's report hook in this one."""
    import subprocess
    import sys

    script = """if True:
        import os, signal
        from mgjax import interrupt

        class Finalized:
            def __del__(self):
                os.kill(os.getpid(), signal.SIGTERM)  # the handler runs in here, at the next bytecode
                sum(range(1000))

        with interrupt.handled():
            obj = Finalized()
            del obj
            try:
                interrupt.check()
            except interrupt.Terminated:
                print("raised at check")
    """
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout == "raised at check\n", out
    assert out.stderr == "", out.stderr


def test_commands_keep_compiled_programs_in_a_persistent_cache(tmp_path, monkeypatch, capsys):
    """Every command turns on JAX's persistent compilation cache ($XDG_CACHE_HOME/mgjax/xla by default) so that
    a second run loads its programs; MGJAX_COMPILE_CACHE moves it or turns it off, JAX's own variable wins, and
    an unusable folder is one line and no cache (JAX would warn at every compile)."""
    import os
    import subprocess
    import sys

    from mgjax.cli import compile_cache

    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "MGJAX_COMPILE_CACHE")}
    env.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    out = subprocess.run([sys.executable, "-m", "mgjax", "predict", str(CASE / "MGM-7B-tiny"), "--image",
                          str(CASE / "input.jpg")], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert any(p.name.startswith("jit_") for p in (tmp_path / "xdg" / "mgjax" / "xla").iterdir())

    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))  # JAX's own (the tests set it)
    monkeypatch.setenv("MGJAX_COMPILE_CACHE", str(tmp_path / "ours"))
    assert compile_cache() == str(tmp_path / "jax")
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    monkeypatch.setenv("MGJAX_COMPILE_CACHE", "off")
    assert compile_cache() is None
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("MGJAX_COMPILE_CACHE", str(tmp_path / "file" / "xla"))
    assert compile_cache() is None
    err = capsys.readouterr().err
    assert err.startswith(f"mgjax: compilation cache off: cannot create {tmp_path / 'file' / 'xla'}") and \
        err.count("\n") == 1 and "MGJAX_COMPILE_CACHE" in err
