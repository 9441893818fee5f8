"""Running our merge and mergekit's on the same config, and comparing their outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str, cwd=None, env=None) -> subprocess.CompletedProcess:
    """Our command line, as a user runs it."""
    environment = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run([sys.executable, "-m", "merging", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=environment, timeout=300)


def run_mergekit(config_text: str, out_dir: Path) -> Path:
    """mergekit 0.1.5 in this process (the reference implementation; tests only)."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    config = MergeConfiguration.model_validate(yaml.safe_load(config_text))
    run_merge(config, str(out_dir), options=MergeOptions(device="cpu", quiet=True, copy_tokenizer=True),
              config_source=config_text)
    return out_dir


def run_mergekit_multi(config_text: str, out_dir: Path, work: Path) -> Path:
    """mergekit-multi (mergekit/scripts/multimerge.py) in this process: the stages go to
    `work`, the unnamed final stage to `out_dir` (a named one stays in `work`/name)."""
    from mergekit.scripts.multimerge import main

    work.mkdir(parents=True, exist_ok=True)
    (work / "multi.yml").write_text(config_text)
    main.main([str(work / "multi.yml"), "--intermediate-dir", str(work), "--out-path", str(out_dir), "--quiet",
               "--device", "cpu"], standalone_mode=False)
    return out_dir


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def max_relative_error(ours: dict, theirs: dict) -> float:
    assert set(ours) == set(theirs), f"tensor names differ: {sorted(set(ours) ^ set(theirs))}"
    worst = 0.0
    for name, expected in theirs.items():
        actual = ours[name]
        assert actual.shape == expected.shape, name
        assert actual.dtype == expected.dtype, f"{name}: {actual.dtype} vs {expected.dtype}"
        scale = expected.float().abs().max().item() or 1.0
        worst = max(worst, (actual.float() - expected.float()).abs().max().item() / scale)
    return worst


CONFIG_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size", "architectures",
               "model_type", "num_attention_heads", "num_key_value_heads", "tie_word_embeddings")


def assert_same_config(ours: Path, theirs: Path) -> None:
    a = json.loads((Path(ours) / "config.json").read_text())
    b = json.loads((Path(theirs) / "config.json").read_text())
    for key in CONFIG_KEYS + ("dtype",):
        assert a.get(key) == b.get(key), f"config {key}: ours {a.get(key)!r}, mergekit {b.get(key)!r}"


LAUNCHER = """import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(usage.ru_maxrss)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(command: list[str]) -> tuple[int, str, int]:
    """(exit code, output, peak RSS in KB) of a command. A child's ru_maxrss counts the memory
    of the process it was forked from (a test process may hold models), so a small launcher
    forks it and reports its peak."""
    done = subprocess.run([sys.executable, "-c", LAUNCHER, *map(str, command)], cwd=REPO, capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    *output, peak = done.stdout.strip().splitlines()
    return done.returncode, "\n".join(output + [done.stderr.strip()]).strip(), int(peak)
