"""`gdt-tune train` builds a torchrun command from any folder; bad arguments give one line."""

import contextlib
import os
import sys

import pytest

from gdt_tune.cli.main import CONFIGS, RECIPE_MODULE, main, train_command


def test_train_command_single_node_and_multi_node(tmp_path):
    cmd = train_command(["--nproc_per_node", "8", "--config", "llama3_1_8b_gdt_full", "output_dir=/runs/x"])
    assert cmd == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "8", "-m",
                   RECIPE_MODULE, "--config", str(CONFIGS / "llama3_1_8b_gdt_full.yaml"), "output_dir=/runs/x"]
    own = tmp_path / "mine.yaml"
    own.write_text("x: 1\n")
    multi = train_command(["--nnodes", "2", "--nproc_per_node", "8", "--rdzv_backend", "c10d", "--rdzv_endpoint",
                           "head:29500", "--config", str(own)])
    assert "--standalone" not in multi and multi[-2:] == ["--config", str(own)]


@pytest.mark.parametrize("args, message", [
    (["--nproc_per_node", "2"], "train needs --config NAME|FILE (shipped: llama3_1_8b_gdt_full, llama3_1_8b_gdt_packed, tiny_gdt_cpu)"),
    (["--config", "llama3_8b"], "--config llama3_8b: no such file and no shipped config of that name"),
    (["--config", "tiny_gdt_cpu", "--nproc_per_node", "2"], "'--nproc_per_node' after --config is not a key=value"),
    (["--bogus", "2", "--config", "tiny_gdt_cpu"], "train: torchrun options before --config: unrecognized arguments: "
                                                   "--bogus; see python -m torch.distributed.run --help"),
    (["--config=llama3_8b"], "--config llama3_8b: no such file and no shipped config of that name"),
])
def test_train_refuses_bad_arguments(args, message, capsys):
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_train_accepts_config_with_an_equals_sign_and_shows_readable_help(capsys):
    assert train_command(["--nproc_per_node", "2", "--config=tiny_gdt_cpu", "a=1"])[-3:] == [
        "--config", str(CONFIGS / "tiny_gdt_cpu.yaml"), "a=1"]
    assert main(["train", "--help"]) == 0
    help_text = capsys.readouterr().out
    assert "examples:" in help_text and " h,   help" not in help_text


def test_cp_into_a_missing_folder_is_one_line(tmp_path, capsys):
    assert main(["cp", "tiny_gdt_cpu", str(tmp_path / "missing" / "dir" / "x.yaml")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: cp: {tmp_path / 'missing' / 'dir'} is not a folder; create it first or give another DEST\n"


@pytest.mark.parametrize("make_args, code, message", [
    (lambda d, t: ["evaluate", "--checkpoint", str(t / "nope"), "--data", str(d / "data" / "test")], 1,
     "error: --checkpoint {t}/nope is not a folder; give a run's step_N or epoch_N"),
    (lambda d, t: ["evaluate", "--checkpoint", str(d / "model"), "--data", str(d / "data"), "--max-samples", "-3"], 2,
     "error: argument --max-samples: '-3' is not an integer >= 1 (see gdt-tune evaluate --help)"),
    (lambda d, t: ["evaluate", "--data", "x"], 2, "error: the following arguments are required: --checkpoint"),
    (lambda d, t: ["evaluate", "--checkpoint", str(d / "model"), "--data", str(t / "x.jsonl.gz")], 1,
     "error: --data: {t}/x.jsonl.gz matches no file"),
    (lambda d, t: ["data-report", "--data", str(d / "data"), "--tokenizer", str(d / "model" / "special_tokens.json"),
                   "--out", str(t / "r")], 1,
     "error: --tokenizer {d}/model/special_tokens.json is not a tiktoken tokenizer.model (ValueError)"),
    (lambda d, t: ["data-report", "--data", str(t / "nowhere"), "--tokenizer", str(d / "model" / "tokenizer.model")], 1,
     "error: --data: {t}/nowhere matches no file; check the path or glob"),
    (lambda d, t: ["data-report", "--data", "x", "--tokenizer", "y", "--max-seq-len", "8"], 2,
     "error: argument --max-seq-len: '8' is not an integer >= 16"),
    (lambda d, t: ["export", "--checkpoint", str(t / "nope"), "--out", str(t / "x")], 1,
     "error: --checkpoint {t}/nope is not a folder; give a run's step_N or epoch_N"),
    (lambda d, t: ["export", "--checkpoint", str(d / "data"), "--out", str(t / "x")], 1,
     "error: --checkpoint {d}/data is neither an interim step_N nor a final epoch_N folder"),
    (lambda d, t: ["evaluate", "--checkpoint", str(d / "model"), "--data", str(d / "data" / "test"), "--out",
                   str(d / "model" / "config.json")], 1, "error: --out {d}/model/config.json is a file; give a folder"),
    (lambda d, t: ["evaluate", "--checkpoint", str(d / "model"), "--data", str(d / "data" / "test"), "--device",
                   "cuda"], 1, "error: --device cuda: no CUDA device is visible here; give --device cpu"),
    (lambda d, t: ["plot-run", str(t)], 1, "error: {t}/logs holds no DiskLogger *.txt files"),
    # an output folder that cannot be written is refused before the work (issue 39; as root a chmod does not
    # stop a write, so the folder's parent is a file)
    (lambda d, t: ["data-report", "--data", str(d / "data"), "--tokenizer", str(d / "model" / "tokenizer.model"),
                   "--out", str(d / "model" / "config.json" / "r")], 1,
     "error: --out {d}/model/config.json/r: cannot create or write it ({d}/model/config.json is not a writable folder)"),
    (lambda d, t: ["plot-run", str(t), "--out", str(d / "model" / "config.json")], 1,
     "error: --out {d}/model/config.json is a file; give a folder"),
    (lambda d, t: ["export", "--checkpoint", str(d / "model"), "--out", str(d / "data" / "test" / "part-00000.jsonl" / "x")],
     1, "error: --out {d}/data/test/part-00000.jsonl/x: cannot create or write it ({d}/data/test/part-00000.jsonl is "
        "not a writable folder)"),
    (lambda d, t: ["evaluate", "--checkpoint", str(d / "model"), "--data", str(d / "data" / "test"), "--out",
                   str(d / "model" / "eval")], 1,
     "error: --out {d}/model/eval is inside the checkpoint {d}/model: predictions.jsonl (per-sample truths, file:line) "
     "would travel with it into an export; give a folder outside it"),
    (lambda d, t: ["demo", "--steps", "0"], 2, "error: argument --steps: '0' is not an integer >= 1"),
    (lambda d, t: ["bogus"], 2, "error: argument command: invalid choice: 'bogus'"),
])
def test_cli_errors_are_one_line_naming_the_option(make_args, code, message, demo_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) if code == 2 else contextlib.nullcontext() as exit_info:
        rc = main(make_args(demo_dir, tmp_path))
    rc = exit_info.value.code if code == 2 else rc  # argparse exits
    err = capsys.readouterr().err
    assert rc == code
    assert err.startswith(message.format(d=demo_dir, t=tmp_path)) and err.count("\n") == 1, err


def test_evaluate_command_runs_the_same_arguments_under_torchrun():
    from gdt_tune.cli.main import evaluate_command

    for argv in (["evaluate", "--nproc_per_node", "4", "--checkpoint", "C", "--data", "D"],
                 ["evaluate", "--checkpoint", "C", "--nproc_per_node=4", "--data", "D"]):
        cmd = evaluate_command(argv, 4)
        assert cmd[1:7] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4", "-m"]
        assert cmd[7:] == ["gdt_tune.cli", "evaluate", "--checkpoint", "C", "--data", "D"]



def test_tilde_key_removes_a_key_as_tune_run_does(tmp_path):
    """``gdt-tune train ... ~key`` goes to the recipe as ``tune run`` takes it (tests/test_launcher.py
    trains with ``~lr_scheduler``); torchtune's parse drops the key; evaluate and export drop it too."""
    from recipe_utils import load_config

    from gdt_tune.cli.main import _load_config
    from gdt_tune.training.config import parse

    cmd = train_command(["--nproc_per_node", "2", "--config", "tiny_gdt_cpu", "~lr_scheduler", "a=1"])
    assert cmd[-2:] == ["~lr_scheduler", "a=1"]
    cfg = load_config("~lr_scheduler", "~dataset.truncation")
    assert "lr_scheduler" not in cfg and "truncation" not in cfg.dataset
    parse(cfg, cuda_available=False)  # the typed config takes it
    loaded = _load_config("tiny_gdt_cpu", ["~lr_scheduler", "~dataset.truncation", "seed=3"])
    assert "lr_scheduler" not in loaded and "truncation" not in loaded.dataset and loaded.seed == 3
    with pytest.raises(ValueError, match=r"^~dataset.nope: the config has no key 'dataset.nope' to remove$"):
        _load_config("tiny_gdt_cpu", ["~dataset.nope"])
    with pytest.raises(ValueError, match=r"^~dataset_val: a component cannot be removed; set dataset_val=null"):
        _load_config("tiny_gdt_cpu", ["~dataset_val"])
    with pytest.raises(ValueError, match="not a key=value or ~key"):
        train_command(["--config", "tiny_gdt_cpu", "~"])


def test_a_second_evaluate_into_the_same_out_is_refused_naming_the_first(demo_dir, tmp_path, capsys):
    from gdt_tune.training.run_dir import OutputDirLock

    first = OutputDirLock(tmp_path / "eval", key="--out", holder="evaluate")
    first.acquire()  # an evaluate still writing there
    try:
        rc = main(["evaluate", "--checkpoint", str(demo_dir / "model"), "--data", str(demo_dir / "data" / "test"),
                   "--out", str(tmp_path / "eval")])
    finally:
        first.release()
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith(f"error: --out: {tmp_path / 'eval'} is in use by another evaluate (pid {os.getpid()}")
    assert err.rstrip().endswith("wait for it or stop it, or choose another --out") and err.count("\n") == 1


def test_export_refuses_a_checkpoint_holding_evaluates_predictions(demo_dir, tmp_path, capsys):
    import shutil

    checkpoint = tmp_path / "epoch_0"
    shutil.copytree(demo_dir / "model", checkpoint)
    (checkpoint / "eval").mkdir()
    (checkpoint / "eval" / "predictions.jsonl").write_text("{}\n")
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "served")]) == 1
    assert capsys.readouterr().err == (f"error: --checkpoint {checkpoint} holds evaluate's {checkpoint}/eval/predictions.jsonl "
                                       "(per-sample truths, file:line), which must not reach a serving folder; move it "
                                       "out of the checkpoint, then export\n")
    assert not (tmp_path / "served").exists()


def test_a_config_that_does_not_parse_is_one_line_before_torchrun_starts(tmp_path, capsys):
    bad = tmp_path / "tab.yaml"
    bad.write_text("output_dir: /tmp/x\nmodel:\n\t_component_: a\n")  # a tab indents
    assert main(["train", "--nproc_per_node", "2", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --config {bad} is not valid YAML (while scanning") and "line 3, column 1" in err
    assert err.rstrip().endswith("(indent with spaces, not tabs)") and err.count("\n") == 1
    assert main(["train", "--config", "tiny_gdt_cpu", "dataset.patient_ids=[SYN0001,SYN0002"]) == 2
    err = capsys.readouterr().err
    assert err == ("error: override 'dataset.patient_ids=<redacted>' does not parse (redacted); write key=value, a list "
                   "as key=[a,b], a text with spaces in quotes\n")
    assert main(["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "o"), "--config", str(bad)]) == 1
    assert capsys.readouterr().err.startswith(f"error: --config {bad} is not valid YAML")


def test_the_launchers_echoed_command_holds_no_patient_ids(tmp_path, capsys):
    from gdt_tune.cli.launcher import run_training

    cmd = [sys.executable, "-c", "pass", "dataset.patient_ids=[SYN0001,SYN0002]", "seed=3"]
    assert run_training(cmd, dict(os.environ, GDT_TUNE_LOG_DIR=str(tmp_path))) == 0
    out = capsys.readouterr().out
    assert "SYN000" not in out and "dataset.patient_ids=<redacted> seed=3" in out


@pytest.mark.parametrize("signum, code, said", [
    ("SIGINT", 130, "error: interrupted (Ctrl-C); evaluate stopped, and no file it writes is left half-written"),
    ("SIGTERM", 143, "error: stopped by SIGTERM; evaluate stopped, and no file it writes is left half-written")])
def test_evaluate_stopped_by_a_signal_is_one_line_and_the_shells_exit_code(demo_dir, tmp_path, capsys, monkeypatch,
                                                                           signum, code, said):
    """Ctrl-C used to print dozens of lines of KeyboardInterrupt tracebacks and exit 1; SIGTERM to end
    silently. The signal arrives while the forecasts are generated."""
    import signal
    import time

    import gdt_tune.eval.evaluate as ev

    real = ev.generate_forecasts

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), getattr(signal, signum))
        time.sleep(5)  # its handler runs here
        return real(*args, **kwargs)

    monkeypatch.setattr(ev, "generate_forecasts", interrupted)
    out = tmp_path / "eval"
    rc = main(["evaluate", "--checkpoint", str(demo_dir / "model"), "--data", str(demo_dir / "data" / "test"),
               "--out", str(out), "--max-samples", "3", "--samples", "0"])
    err = capsys.readouterr().err
    assert rc == code and err.rstrip().splitlines()[-1] == said and "Traceback" not in err, err
    assert [p.name for p in out.iterdir()] == [".lock"]
