"""The command line against hostile recipes, crashes and concurrent runs: OUT_DIR claimed by
one run at a time, nothing left behind by SIGTERM, leftovers of SIGKILL swept by the next
run, a full disk refused before work or reported in one line, headers and configs not
believed.

Runs that must be caught mid-merge are frozen with SIGSTOP as soon as their `.out.partial-*`
folder appears, so what happens next does not depend on the machine's speed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# torch, transformers and the test helpers are imported where used: this module also runs as
# the driver inside a private mount namespace, where start-up time counts
REPO = Path(__file__).resolve().parent.parent
SLERP = "models:\n  - model: {child}\nmerge_method: slerp\nbase_model: {base}\nparameters:\n  t: 0.5\n"
PASSTHROUGH = "models:\n  - model: {model}\nmerge_method: passthrough\n"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A small pair (fast merges) and a wider one whose merge lasts long enough to stop."""
    from tiny_models import make_base, make_child

    root = tmp_path_factory.mktemp("safety-models")
    small = make_base(root / "small", seed=0)
    wide = make_base(root / "wide", hidden=128, seed=1)
    return {"small": small, "small_child": make_child(small, root / "small_child", seed=2),
            "wide": wide, "wide_child": make_child(wide, root / "wide_child", seed=3)}


def recipe(tmp_path: Path, text: str, **paths) -> Path:
    path = tmp_path / "recipe.yml"
    path.write_text(text.format(**{k: str(v) for k, v in paths.items()}))
    return path


def wide_recipe(tmp_path: Path, models) -> Path:
    return recipe(tmp_path, SLERP, base=models["wide"], child=models["wide_child"])


def start_cli(*args, log: Path) -> subprocess.Popen:
    """The command line in the background; stderr goes to `log` (a pipe could fill and stall it)."""
    environment = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "merging", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=open(log, "w"), env=environment)


def stop_while_writing(process: subprocess.Popen, parent: Path, name: str = "out", timeout: float = 120) -> None:
    """SIGSTOP `process` once its partial output folder exists: it is then mid-merge for sure."""
    deadline = time.monotonic() + timeout
    while not any(parent.glob(f".{name}.partial-*")):
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the merge ended (code {process.poll()}) before it could be caught writing")
        time.sleep(0.002)
    process.send_signal(signal.SIGSTOP)
    assert process.poll() is None and not (parent / name).exists(), "the merge finished before it was stopped"


def hidden_entries(parent: Path, name: str = "out") -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def last_line(text: str) -> str:
    """The last line of stderr (tqdm redraws its bar with carriage returns on one line)."""
    return text.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def reference(models, tmp_path_factory) -> dict:
    """The wide merge done in this process, uninterrupted and alone."""
    from helpers import load_tensors
    from merging import merge

    out = tmp_path_factory.mktemp("reference") / "out"
    merge(SLERP.format(base=models["wide"], child=models["wide_child"]), out)
    return load_tensors(out)


def assert_same_tensors(out: Path, reference: dict) -> None:
    import torch
    from helpers import load_tensors

    merged = load_tensors(out)
    assert set(merged) == set(reference) and len(merged) == 39
    assert all(torch.equal(merged[name], reference[name]) for name in reference)


# ---- claims, signals, stale folders ------------------------------------------------------------
def test_a_second_run_to_the_same_folder_fails_at_once_while_the_first_completes(models, reference, tmp_path):
    from transformers import AutoModelForCausalLM
    from helpers import run_cli

    config, out = wide_recipe(tmp_path, models), tmp_path / "out"
    first = start_cli(config, out, log=tmp_path / "first.log")
    stop_while_writing(first, tmp_path)
    try:
        started = time.monotonic()
        second = run_cli(config, out)
        seconds = time.monotonic() - started
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2, second.stderr
    assert second.stderr.strip() == f"error: another merge is writing to '{out.resolve()}' right now"
    assert seconds < 30  # refused, not queued behind the first (which stays stopped meanwhile)
    assert first.wait(timeout=120) == 0, (tmp_path / "first.log").read_text()
    assert_same_tensors(out, reference)
    assert AutoModelForCausalLM.from_pretrained(out).config.hidden_size == 128
    assert hidden_entries(tmp_path) == []  # the partial folder became `out`; the lock file is gone


def test_sigterm_mid_merge_leaves_nothing_behind(models, tmp_path):
    config, out = wide_recipe(tmp_path, models), tmp_path / "out"
    process = start_cli(config, out, log=tmp_path / "cli.log")
    stop_while_writing(process, tmp_path)
    assert hidden_entries(tmp_path) != []  # there was something to clean up
    process.send_signal(signal.SIGTERM)  # delivered when it runs again
    process.send_signal(signal.SIGCONT)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM
    log = (tmp_path / "cli.log").read_text()
    assert last_line(log) == "interrupted; nothing was written" and "Traceback" not in log
    assert not out.exists() and hidden_entries(tmp_path) == []


def test_after_sigkill_the_next_run_sweeps_the_leftovers_and_succeeds(models, reference, tmp_path):
    from helpers import run_cli

    config, out = wide_recipe(tmp_path, models), tmp_path / "out"
    process = start_cli(config, out, log=tmp_path / "cli.log")
    stop_while_writing(process, tmp_path)
    process.kill()
    process.wait(timeout=60)
    left = hidden_entries(tmp_path)
    assert ".out.lock" in left and any(n.startswith(".out.partial-") for n in left)  # nothing could clean up
    (tmp_path / ".out.stages-0123456789ab").mkdir()  # what a killed multi-stage run leaves
    (tmp_path / ".out.old-0123456789ab").mkdir()
    (tmp_path / ".outer.partial-0123456789ab").mkdir()  # another output's: not ours to remove
    (tmp_path / ".out.partial-mine.txt").write_text("not a name we make")
    result = run_cli(config, out)
    assert result.returncode == 0, result.stderr
    assert_same_tensors(out, reference)
    assert hidden_entries(tmp_path) == [".out.partial-mine.txt"]
    assert (tmp_path / ".outer.partial-0123456789ab").is_dir()


# ---- a full disk --------------------------------------------------------------------------------
def out_of_space_runs(config: str, mount_dir: str, small_kb: int, large_kb: int) -> dict:
    """Run inside a private mount namespace (as root there): the CLI onto a tmpfs too small for
    the output, then onto one that holds it until another writer fills it mid-merge."""
    mount = Path(mount_dir)

    def tmpfs(size_kb: int) -> None:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mount)], check=True)

    def cli(log: Path) -> subprocess.Popen:
        return start_cli(config, mount / "out", log=log)

    report = {}
    try:
        tmpfs(small_kb)
    except subprocess.CalledProcessError as error:
        return {"skip": f"cannot mount a tmpfs in a private mount namespace ({error})"}
    log = Path(config).parent / "refused.log"
    report["refused"] = {"code": cli(log).wait(timeout=120), "stderr": log.read_text(),
                         "left": sorted(p.name for p in mount.iterdir())}
    subprocess.run(["umount", str(mount)], check=True)
    tmpfs(large_kb)
    log = Path(config).parent / "filled.log"
    process = cli(log)
    stop_while_writing(process, mount)
    with open(mount / "filler", "wb") as filler:  # someone else takes the rest of the disk
        chunk = b"\0" * 65536
        try:
            while True:
                filler.write(chunk)
                filler.flush()
        except OSError as error:
            report["filler_error"] = error.errno
    process.send_signal(signal.SIGCONT)
    report["filled"] = {"code": process.wait(timeout=120), "stderr": log.read_text(),
                        "left": sorted(p.name for p in mount.iterdir())}
    return report


def test_a_full_disk_is_refused_before_work_or_reported_in_one_line(models, tmp_path):
    import errno

    from merging.pipeline import plan_stages
    from merging.plan import format_bytes

    if shutil.which("unshare") is None or shutil.which("mount") is None:
        pytest.skip("needs unshare and mount to give the CLI a small disk of its own")
    config = wide_recipe(tmp_path, models)
    needed = plan_stages(config.read_text())[0].disk_bytes
    mount = tmp_path / "disk"
    mount.mkdir()
    small_kb, large_kb = 1024, needed // 1024 + 2048
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            "from test_cli_safety import out_of_space_runs; "
            f"print(json.dumps(out_of_space_runs({str(config)!r}, {str(mount)!r}, {small_kb}, {large_kb})))")
    namespace = subprocess.run(["unshare", "-rm", sys.executable, "-c", code], capture_output=True, text=True,
                               timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))
    if namespace.returncode != 0 and "unshare failed" in namespace.stderr:
        pytest.skip(f"no private mount namespace here: {namespace.stderr.strip()}")
    assert namespace.returncode == 0, namespace.stderr
    report = json.loads(namespace.stdout.strip().splitlines()[-1])
    if "skip" in report:
        pytest.skip(report["skip"])

    refused = report["refused"]
    assert refused["code"] == 2, refused["stderr"]
    assert refused["stderr"].strip() == (f"error: the output needs {format_bytes(needed)} on the disk of "
                                         f"'{mount.resolve()}', which has {format_bytes(small_kb * 1024)} free")
    assert refused["left"] == []

    filled = report["filled"]
    assert report["filler_error"] == errno.ENOSPC  # the disk really was full
    assert filled["code"] == 2, filled["stderr"]
    assert "Traceback" not in filled["stderr"]
    assert last_line(filled["stderr"]) == ("error: the disk ran out of space while writing (No space left on "
                                           f"device); nothing was written to {mount / 'out'}")
    assert filled["left"] == ["filler"]  # no partial folder, no lock file, no output


# ---- headers and configs are not believed -------------------------------------------------------
def safetensors_bytes(header, data: bytes = b"\0" * 16) -> bytes:
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(encoded).to_bytes(8, "little") + encoded + data


F32_PAIR = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
BAD_HEADERS = {  # kind: (file bytes, what the one line says)
    "header not json": (safetensors_bytes(b"{not json"), "is not a readable safetensors file"),
    "header length past the end": ((10**6).to_bytes(8, "little") + b"{}", "runs past the end of the file"),
    "header a list": (safetensors_bytes([1, 2]), "its header is not a JSON object"),
    "metadata not strings": (safetensors_bytes({"__metadata__": {"format": 1}, "w": F32_PAIR}),
                             "__metadata__ that is not a mapping of strings"),
    "entry a list": (safetensors_bytes({"w": [1, 2]}), "tensor 'w' in '{file}' is described by a JSON list"),
    "no data_offsets": (safetensors_bytes({"w": {"dtype": "F32", "shape": [2]}}),
                        "tensor 'w' in '{file}' has no 'data_offsets'"),
    "unknown dtype": (safetensors_bytes({"w": {**F32_PAIR, "dtype": "F7"}}), "has unsupported dtype 'F7'"),
    "shape of strings": (safetensors_bytes({"w": {**F32_PAIR, "shape": ["2"]}}),
                         "tensor 'w' in '{file}' has shape ['2'], not a list of non-negative integers"),
    "negative size": (safetensors_bytes({"w": {**F32_PAIR, "shape": [-2, -1]}}), "has shape [-2, -1]"),
    "offsets reversed": (safetensors_bytes({"w": {**F32_PAIR, "data_offsets": [8, 0]}}),
                         "has data_offsets [8, 0], not two integers 0 <= start <= end"),
    "shape larger than its bytes": (safetensors_bytes({"w": {**F32_PAIR, "shape": [10**9, 10**9]}}),
                                    "tensor 'w' in '{file}' claims shape [1000000000, 1000000000] of F32 "
                                    "(4000000000000000000 bytes) over 8 bytes"),
    "data past the end": (safetensors_bytes({"w": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}}),
                          "'{file}' is truncated: tensor 'w' ends past the end of the file"),
    "overlapping tensors": (safetensors_bytes({"a": F32_PAIR, "b": {**F32_PAIR, "data_offsets": [4, 12]}}),
                            "tensors 'a' and 'b' in '{file}' overlap"),
}


def hostile_model(tmp_path: Path, models, weights: bytes) -> Path:
    folder = tmp_path / "hostile"
    folder.mkdir()
    shutil.copy(models["small"] / "config.json", folder)
    (folder / "model.safetensors").write_bytes(weights)
    return folder


@pytest.mark.parametrize("kind", sorted(BAD_HEADERS))
def test_a_malformed_header_is_one_line(kind, models, tmp_path, capsys):
    """main() in this process: the same code as `python -m merging`, without a start-up per case."""
    from merging.__main__ import main

    weights, message = BAD_HEADERS[kind]
    folder = hostile_model(tmp_path, models, weights)
    code = main([str(recipe(tmp_path, PASSTHROUGH, model=folder)), str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert code == 2, error
    assert len(error.strip().splitlines()) == 1 and error.startswith("error: "), error
    assert message.format(file=folder / "model.safetensors") in error
    assert str(folder / "model.safetensors") in error
    assert not (tmp_path / "out").exists() and hidden_entries(tmp_path) == []


def test_a_huge_shape_over_a_few_bytes_costs_no_memory(models, tmp_path):
    """The real CLI, its peak memory measured by wait4 through a small launcher (a child forked
    from this test process would count the test's memory too)."""
    from helpers import run_measured

    weights, message = BAD_HEADERS["shape larger than its bytes"]
    folder = hostile_model(tmp_path, models, weights)
    code, output, peak_kb = run_measured([sys.executable, "-m", "merging", recipe(tmp_path, PASSTHROUGH, model=folder),
                                          tmp_path / "out"])
    assert code == 2, output
    assert output == "error: " + message.format(file=folder / "model.safetensors")
    assert peak_kb < 700_000, f"peak RSS {peak_kb} KB"  # torch alone takes about 230 MB


def config_without(models, tmp_path: Path, key: str, rename: str = "") -> Path:
    """The small child with `key` removed from its config.json (or renamed to `rename`)."""
    folder = tmp_path / f"no_{key}"
    shutil.copytree(models["small_child"], folder)
    config = json.loads((folder / "config.json").read_text())
    value = config.pop(key)
    if rename:
        config[rename] = value
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_config_without_hidden_size_is_refused_by_the_cli(models, tmp_path):
    from helpers import run_cli

    folder = config_without(models, tmp_path, "hidden_size")
    result = run_cli(recipe(tmp_path, SLERP, base=models["small"], child=folder), tmp_path / "out")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (f"error: config.json of model '{folder}' has no hidden_size (nor n_embd, "
                                     "d_model); a merge of it would not load in transformers")
    assert not (tmp_path / "out").exists() and hidden_entries(tmp_path) == []


@pytest.mark.parametrize("key", ["model_type", "num_hidden_layers", "vocab_size"])
def test_a_config_without_what_a_loader_needs_is_refused(key, models, tmp_path, capsys):
    from merging.__main__ import main

    folder = config_without(models, tmp_path, key)
    code = main([str(recipe(tmp_path, SLERP, base=models["small"], child=folder)), str(tmp_path / "out"),
                 "--dry-run"])
    error = capsys.readouterr().err
    assert code == 2
    assert error.startswith(f"error: config.json of model '{folder}' has no {key}") and error.count("\n") == 1


@pytest.mark.parametrize("key, alias", [("hidden_size", "n_embd"), ("num_hidden_layers", "n_layer"),
                                        ("vocab_size", "text_config")])
def test_the_usual_aliases_and_a_nested_text_config_are_accepted(key, alias, models, tmp_path, capsys):
    from merging.__main__ import main

    folder = config_without(models, tmp_path, key, rename="" if alias == "text_config" else alias)
    if alias == "text_config":  # a multimodal model keeps the language model's sizes here
        config = json.loads((folder / "config.json").read_text())
        config["text_config"] = {key: 96}
        (folder / "config.json").write_text(json.dumps(config))
    code = main([str(recipe(tmp_path, SLERP, base=models["small"], child=folder)), str(tmp_path / "out"),
                 "--dry-run"])
    assert code == 0, capsys.readouterr().err
    assert "dry run: all checks passed" in capsys.readouterr().out


# ---- the library pieces the CLI stands on ------------------------------------------------------
def test_atomic_folder_changes_no_umask_and_the_kernel_applies_it(tmp_path, monkeypatch):
    """os.umask both reads and sets: any call from a server thread races with every other."""
    from merging.writer import atomic_folder

    previous = os.umask(0o027)
    calls = []
    monkeypatch.setattr(os, "umask", lambda *args: calls.append(args))  # a spy: it must stay unused
    try:
        with atomic_folder(tmp_path / "out") as partial:
            assert partial.name.startswith(".out.partial-")
            assert (partial.stat().st_mode & 0o777) == 0o750
    finally:
        monkeypatch.undo()
        os.umask(previous)
    assert calls == []
    assert ((tmp_path / "out").stat().st_mode & 0o777) == 0o750
    assert hidden_entries(tmp_path) == []


def test_a_thread_writing_to_a_claimed_folder_is_refused(tmp_path):
    """flock locks belong to open files, not processes: two writers in one server collide too."""
    import threading

    from merging.errors import MergeError
    from merging.writer import atomic_folder

    outcome = {}

    def second_writer():
        try:
            with atomic_folder(tmp_path / "out"):
                outcome["second"] = "wrote"
        except MergeError as error:
            outcome["second"] = str(error)

    with atomic_folder(tmp_path / "out") as partial:
        (partial / "weights").write_text("first")
        thread = threading.Thread(target=second_writer)
        thread.start()
        thread.join()
    assert outcome["second"] == f"another merge is writing to '{(tmp_path / 'out').resolve()}' right now"
    assert (tmp_path / "out" / "weights").read_text() == "first"


def test_stage_outputs_get_names_the_program_chooses(models, tmp_path):
    import torch
    from safetensors.torch import load_file

    from merging.pipeline import merge, stage_folder_name

    assert stage_folder_name(0, "../../etc") == "00-.._.._etc"
    assert stage_folder_name(3, "/abs/path") == "03-_abs_path"
    text = (f"name: first\nmodels:\n  - model: {models['small_child']}\nmerge_method: slerp\n"
            f"base_model: {models['small']}\nparameters: {{t: 0.5}}\n---\n"
            f"name: final\nmodels:\n  - model: first\nmerge_method: passthrough\n")
    merge(text, tmp_path / "out", intermediate_dir=tmp_path / "stages")
    assert sorted(p.name for p in (tmp_path / "stages").iterdir()) == ["00-first"]
    merged = load_file(tmp_path / "out" / "model.safetensors")
    staged = load_file(tmp_path / "stages" / "00-first" / "model.safetensors")
    assert set(merged) == set(staged) and all(torch.equal(merged[n], staged[n]) for n in merged)
    merge(text, tmp_path / "again")  # without --intermediate-dir: a hidden stages folder, then nothing
    assert hidden_entries(tmp_path, "again") == []
