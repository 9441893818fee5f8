"""A stranger's attacks on a public MergeLab: `python app.py` with MERGELAB_PUBLIC=1, attacked
through gradio_client and through raw HTTP (the queue, the file routes, the upload route),
as anyone could attack a public Hugging Face Space.

Every attack must be refused with one readable line, or do no harm. Around them all: a canary
tree outside the allowed folders, the demo models themselves, the working tree and the hub
cache are checksummed before and after (not one byte may change), and the servers' memory is
sampled throughout.

Two servers: `main` with the public defaults (hub offline), and `small` (2 sessions, idle
after 8 s, a 2.5 GB memory budget, a fake hub with private repos) for the lifecycle and hub
attacks. Both start at once, when the first test asks for them. Each server prints its
threads' Python stacks on SIGUSR1 (a sitecustomize hook the tests add), so a test can see
which threads still run MergeLab's code.

Tests that fail here are attacks that worked: each failure says which request did what.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from helpers import run_measured  # noqa: E402
from attack_helpers import (REPO, PublicServer, RawVisitor, changes, error_of, get_file, http,  # noqa: E402
                            repo_untracked, start_public_server, tree_digest, upload)

SECRET = "TOPSECRET-canary-7c1e"  # the canary's secret file holds this; no answer may
TEMPLATE_SECRET = "CANARY-TEMPLATE-9d2f"  # the canary's .jinja file raises this when rendered
HISTORY_FILES = ("history.sqlite", "history.sqlite-wal", "history.sqlite-shm")  # the app's own, in the cache
# The main server holds at most two float32 merges of the 135M demo model (0.54 GB each), their two
# parents, a sweep's model and a bfloat16 merge with its parent: about 3.5 GB, 5 GB with the
# allocator's slack. More means something was held that should not have been.
MAIN_RSS_MB = 6000
SMALL_RSS_MB = 2500  # two or three bfloat16 merges and a parent at most (its budget is 2.5 GB)
REFUSAL_GROWTH_MB = 200  # what a test made of refusals may add to the server's memory


# ---- the world the attacks run in -------------------------------------------------------
@dataclass
class World:
    main: PublicServer
    small: PublicServer
    canary: Path
    family: dict  # the demo models: name -> folder
    watched: dict  # name -> folder whose every byte must survive
    before: dict
    untracked: set
    peaks: dict = field(default_factory=dict)  # server -> highest RSS seen (MB)
    samples: dict = field(default_factory=dict)  # server -> [(time, MB)]
    phases: list = field(default_factory=list)  # (start time, test name), to say when memory peaked

    @property
    def secret(self) -> Path:
        return self.canary / "secret.txt"

    @property
    def model(self) -> Path:
        return self.canary / "model"

    def demo(self, name: str) -> str:
        return str(self.family[name])

    def peak_since(self, name: str, since: float) -> float:
        return max((mb for when, mb in list(self.samples.get(name, [])) if when >= since), default=0)

    def by_test(self, name: str) -> list[tuple[str, float, float]]:
        """(test, RSS when it started, highest RSS during it) of one server, test by test."""
        bounds = self.phases + [(float("inf"), "")]
        rows = []
        for (start, test), (end, _) in zip(bounds, bounds[1:]):
            during = [mb for when, mb in list(self.samples.get(name, [])) if start <= when < end]
            if during:
                rows.append((test, during[0], max(during)))
        return rows

    def peaks_by_test(self, name: str) -> str:
        return "; ".join(f"{test} {first:.0f}->{peak:.0f}" for test, first, peak in self.by_test(name))


def make_canary(root: Path, tiny) -> Path:
    """Files a visitor must never read, write or learn about: a real model folder, a LoRA
    adapter, a secret, a chat template that says so when rendered."""
    canary = root / "canary"
    shutil.copytree(tiny["base"], canary / "model")
    (canary / "secret.txt").write_text(SECRET + "\n")
    (canary / "leak.jinja").write_text("{{ raise_exception('" + TEMPLATE_SECRET + "') }}")
    adapter = canary / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
         "base_model_name_or_path": str(canary / "model")}))
    (canary / "folder").mkdir()  # a stage named like it must not replace it
    (canary / "folder" / "keep.txt").write_text("keep\n")
    return canary


def sample_rss(world: World, stop: threading.Event) -> None:
    """The servers' RSS every 0.2 s, so a spike between two tests shows too."""
    while not stop.wait(0.2):
        for name, server in (("main", world.main), ("small", world.small)):
            try:
                mb = server.rss_mb()
            except (OSError, KeyError):
                continue
            world.peaks[name] = max(world.peaks.get(name, 0), mb)
            world.samples.setdefault(name, []).append((time.time(), mb))


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny, demo_cache, demo_family):
    root = tmp_path_factory.mktemp("hostile")
    canary = make_canary(root, tiny)
    watched = {"canary": canary, "demo cache": demo_cache, "hub cache": Path.home() / ".cache" / "huggingface"}
    before = {name: tree_digest(folder, skip=HISTORY_FILES) for name, folder in watched.items()}
    untracked = repo_untracked()
    hub, hub_cache = private_hub(root, tiny)
    main = start_public_server(demo_cache, root / "main")
    small = start_public_server(demo_cache, root / "small", sessions=2, session_idle_seconds=8,
                                memory_budget="2.5GB",
                                env={"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "0"})
    world = World(main, small, canary, {k: Path(v) for k, v in demo_family.items()}, watched, before, untracked)
    stop = threading.Event()
    sampler = threading.Thread(target=sample_rss, args=(world, stop), daemon=True)
    try:
        main.wait_ready()
        small.wait_ready()
        sampler.start()
        yield world
    finally:
        stop.set()
        main.stop()
        small.stop()
        hub.__exit__(None, None, None)


def private_hub(root: Path, tiny):
    """A fake hub (the small server's) with a public base model `org/base` and a private
    LoRA adapter of user 'tester'; and a hub cache that already holds the adapter, as it
    would after its owner, signed in, used it on the Space."""
    from huggingface_hub import snapshot_download

    from fake_hub import FakeHub
    from merging.extract import extract_lora

    adapter = root / "hub" / "secret-adapter"
    extract_lora(str(tiny["c1"]), str(tiny["base"]), adapter, rank=2)
    hub = FakeHub({"org/base": tiny["base"], "tester/secret-adapter": adapter, "tester/secret": tiny["c2"]})
    hub.__enter__()
    hub.private.update({"tester/secret-adapter": True, "tester/secret": True})
    cache = root / "small" / "hub-cache"
    for repo in ("tester/secret-adapter", "tester/secret"):
        snapshot_download(repo, token="hf_good", cache_dir=cache, endpoint=hub.url)
    return hub, cache


REFUSALS_ONLY = set()  # tests that only send what must be refused: they may not grow memory


def refusals_only(test):
    REFUSALS_ONLY.add(test.__name__)
    return test


@pytest.fixture(autouse=True)
def phase(request):
    """Mark when each test starts (the memory samples are read per test)."""
    if "world" in request.fixturenames:
        request.getfixturevalue("world").phases.append((time.time(), request.node.name))
    yield


# ---- asking -------------------------------------------------------------------------------
def client(server: PublicServer):
    from gradio_client import Client

    return Client(server.url, verbose=False)


def refusal(visitor, *args, api_name: str) -> str:
    """The error a call ends with; the test fails if the call succeeds."""
    try:
        result = visitor.predict(*args, api_name=api_name)
    except Exception as error:  # gradio_client raises AppError with the handler's message
        return str(error)
    pytest.fail(f"{api_name} accepted the attack and answered: {str(result)[:400]}")


def assert_readable(message: str, *expected: str) -> None:
    """One line, the app's own words (not a traceback, not 'unexpected error'), no secret."""
    assert message.strip() and "\n" not in message.strip(), message
    assert "Traceback" not in message and "unexpected error" not in message, message
    assert SECRET not in message and TEMPLATE_SECRET not in message and "root:x:0" not in message, message
    for text in expected:
        assert text in message, f"expected {text!r} in: {message}"


def recipe(model: str, other: str, **extra) -> str:
    """A linear merge of two models (the cheapest recipe that names two)."""
    lines = [f"models:\n  - model: {json.dumps(model)}\n  - model: {json.dumps(other)}",
             "merge_method: linear", "parameters: {weight: 0.5}", "dtype: float32"]
    lines += [f"{key}: {json.dumps(value)}" for key, value in extra.items()]
    return "\n".join(lines) + "\n"


def passthrough(model: str, dtype: str = "bfloat16", **extra) -> str:
    lines = [f"models:\n  - model: {json.dumps(model)}", "merge_method: passthrough", f"dtype: {dtype}"]
    lines += [f"{key}: {json.dumps(value)}" for key, value in extra.items()]
    return "\n".join(lines) + "\n"


def moe(base: str, experts: list[str]) -> str:
    lines = [f"base_model: {json.dumps(base)}", "gate_mode: random", "dtype: bfloat16", "experts_per_token: 1",
             "experts:"]
    lines += [f"  - source_model: {json.dumps(e)}\n    positive_prompts: ['x']" for e in experts]
    return "\n".join(lines) + "\n"


def last_answer(history) -> str:
    content = history[-1]["content"] if history else ""
    if isinstance(content, list):  # Gradio may send content as a list of blocks
        content = "".join(block.get("text", "") if isinstance(block, dict) else str(block) for block in content)
    return content


def answers(result) -> list[str]:
    return [last_answer(pane) for pane in result[:3]]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_until(condition, seconds: float, every: float = 0.2):
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    return condition()


def goes_idle(pid: int, seconds: float, busy_below: float = 0.25) -> bool:
    """Whether the process, within `seconds`, spends a whole second using under `busy_below`
    of one core (nothing is left running)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        start = cpu_seconds(pid)
        time.sleep(1.0)
        if cpu_seconds(pid) - start < busy_below:
            return True
    return False


def wait_streaming(job, seconds: float = 60) -> None:
    assert wait_until(lambda: job.outputs() or job.done(), seconds), "no output came"
    assert not job.done() or job.outputs(), f"the job ended at once: {job.exception()}"


# ---- recipes that name server paths -----------------------------------------------------
@refusals_only
def test_a_one_line_recipe_is_never_opened_as_a_path(world):
    """A recipe box holding `/etc/passwd` is YAML (a string), never a file: the answer is the
    same for a file that exists and one that does not, and holds nothing of either."""
    visitor = client(world.main)
    existing = ["/etc/passwd", str(world.secret), "~/.bashrc", str(world.model), f"{world.demo('json')}/config.json"]
    missing = ["/etc/no-such-file-7f3a", str(world.canary / "no-such"), "~/.no-such-rc", "/no/such/model"]
    calls = {  # every endpoint that reads a recipe box
        "/check_recipe": lambda r: (r,), "/merge": lambda r: (r, False), "/diagnostics": lambda r: (r, "angle_deg"),
        "/set_t": lambda r: (r, 0.5), "/set_layers": lambda r: (r, "0.5", "0.5", "0.5"), "/read_layers": lambda r: (r,),
        "/sweep_parameters": lambda r: (r,), "/moe_build": lambda r: (r,), "/moe_form": lambda r: (r,),
        "/publish": lambda r: (r, "me/x", True, "hf_not_a_token"),
    }
    visitors = [visitor] + [client(world.main) for _ in range(2)]

    def answers_of(index_and_api):
        index, api_name = index_and_api
        caller = visitors[index % len(visitors)]
        return api_name, {path: refusal(caller, *calls[api_name](path), api_name=api_name).replace(path, "<path>")
                          for path in existing + missing}

    with ThreadPoolExecutor(len(visitors)) as pool:
        for api_name, said in pool.map(answers_of, enumerate(calls)):
            for message in said.values():
                assert_readable(message)
            assert len(set(said.values())) == 1, f"{api_name} answers differently for existing files: {said}"
    for caller in visitors:
        caller.close()


@refusals_only
def test_save_to_a_server_folder_is_off(world):
    visitor = client(world.main)
    for folder in (str(world.canary / "folder"), world.demo("json"), "../../x", "merged-model"):
        message = refusal(visitor, passthrough(world.demo("json")), folder, api_name="/save")
        assert_readable(message, "saving to the server's disk is off on a public deployment")


STAGE_NAMES = ["/some/folder", "../../x", "..", ".", "~", "~/x", "a/b", "smollm2-json/../../x", "-rf",
               "x" * 101, "a\nb", "C:\\x", "x\x00y"]


def multi_stage(name: str, first: str, second: str, final_dtype: str = "bfloat16") -> str:
    return (f"name: {json.dumps(name)}\n" + passthrough(first, "bfloat16") + "---\n"
            + f"name: final\nmodels:\n  - model: {json.dumps(name)}\n  - model: {json.dumps(second)}\n"
            + f"merge_method: linear\nparameters: {{weight: 0.5}}\ndtype: {final_dtype}\n")


@refusals_only
def test_stage_names_that_are_paths_are_refused(world):
    """A stage's name becomes a folder only under a name the program picks; a name that is a
    path is refused before any work, however it is spelled."""
    visitor = client(world.main)
    names = STAGE_NAMES + [str(world.canary / "folder"), world.demo("json"), str(world.family["json"].parent)]
    for name in names:
        text = multi_stage(name, world.demo("json"), world.demo("reverse"))
        for api_name in ("/check_recipe", "/merge"):
            message = refusal(visitor, text, api_name=api_name)
            assert_readable(message, "must be a plain name")
    # a one-document recipe named as a local folder: the name bypasses no check
    text = f"name: {json.dumps(str(world.model))}\n" + passthrough(str(world.model))
    assert_readable(refusal(visitor, text, api_name="/check_recipe"), "must be a plain name")
    assert (world.canary / "folder" / "keep.txt").read_text() == "keep\n"


# ---- local paths as models ----------------------------------------------------------------
def local_references(world: World) -> list[str]:
    """The canary model spelled every way a stranger might: absolute, relative to the server's
    folder, through the home folder, through the allowed demo folder, as a URL."""
    demo = world.family["json"].parent
    return [str(world.model), os.path.relpath(world.model, REPO), "~/" + os.path.relpath(world.model, Path.home()),
            str(demo / os.path.relpath(world.model, demo)),
            f"{world.demo('json')}/../../{os.path.relpath(world.model, demo.parent)}",
            str(world.model) + "/", "file://" + str(world.model), str(world.canary), "/etc", "/"]


@refusals_only
def test_local_paths_are_refused_as_models_bases_adapters_and_tokenizers(world):
    visitor = client(world.main)
    for reference in local_references(world):
        for text in (recipe(reference, world.demo("json")), recipe(world.demo("json"), reference),
                     f"models:\n  - model: {json.dumps(world.demo('json'))}\nmerge_method: slerp\n"
                     f"base_model: {json.dumps(reference)}\nparameters: {{t: 0.5}}\n",
                     passthrough(reference)):
            message = refusal(visitor, text, api_name="/check_recipe")
            assert_readable(message)
            assert "local paths are disabled on a public deployment" in message or \
                "must be a path or hub id" in message, message
    adapter = str(world.canary / "adapter")
    for reference in (f"org/x+{adapter}", f"{world.demo('json')}+{adapter}", adapter):
        message = refusal(visitor, recipe(reference, world.demo("json")), api_name="/check_recipe")
        assert_readable(message, "local paths are disabled on a public deployment")
    message = refusal(visitor, recipe(f"{world.model}+org/adapter", world.demo("json")), api_name="/check_recipe")
    assert_readable(message)  # the adapter is looked up first: on the hub, offline here
    # a multi-stage file: a local path in an earlier stage, or in the last one beside a stage
    for first, second in ((str(world.model), world.demo("reverse")), (world.demo("json"), str(world.model))):
        for api_name in ("/check_recipe", "/merge"):
            message = refusal(visitor, multi_stage("stage-one", first, second), api_name=api_name)
            assert_readable(message, "local paths are disabled on a public deployment")
    for key in ("tokenizer_source",):  # a tokenizer from a local folder
        message = refusal(visitor, recipe(world.demo("json"), world.demo("reverse"), **{key: str(world.model)}),
                          api_name="/check_recipe")
        assert_readable(message)
    message = refusal(visitor, recipe(world.demo("json"), world.demo("reverse")) + f"tokenizer:\n  source: "
                      f"{json.dumps(str(world.model))}\n", api_name="/check_recipe")
    assert_readable(message)


@refusals_only
def test_local_paths_are_refused_by_every_endpoint_that_opens_models(world):
    visitor = client(world.main)
    for reference in (str(world.model), os.path.relpath(world.model, REPO)):
        text = recipe(world.demo("json"), reference)
        slerp = (f"models:\n  - model: {json.dumps(reference)}\nmerge_method: slerp\n"
                 f"base_model: {json.dumps(world.demo('json'))}\nparameters: {{t: 0.5}}\ndtype: float32\n")
        calls = [("/merge", (text, False)), ("/merge_recipe", (text, False)), ("/diagnostics", (slerp, "angle_deg")),
                 ("/set_layers", (slerp, "0.5", "0.5", "0.5")), ("/read_layers", (slerp,)),
                 ("/edit_layers", (slerp, "0.5", "0.5", "0.5", "attention", "set", 0, 1, 1.0)),
                 ("/sweep", (slerp, "t", 0, 0, 0, 1, 2, "hello there", None, "", None, [], 1)),
                 ("/moe_build", (moe(world.demo("json"), [reference]),)),
                 ("/moe_build", (moe(reference, [world.demo("json")]),))]
        for api_name, arguments in calls:
            message = refusal(visitor, *arguments, api_name=api_name)
            assert_readable(message, "local paths are disabled on a public deployment")
        table = visitor.predict([reference, world.demo("json")], world.demo("reverse"), api_name="/compatibility")
        row = next(line for line in table.splitlines() if line.startswith(f"| `{reference}`"))
        assert "cannot be read" in row and "local paths are disabled" in row and "| 32 |" not in row, row
        # the MoE form writes text only, and Build refuses it
        form = [world.demo("json"), "random", 1, "bfloat16", reference, "x", ""] + [""] * 9
        written = visitor.predict(*form, api_name="/moe_recipe")
        assert_readable(refusal(visitor, written, api_name="/moe_build"),
                        "local paths are disabled on a public deployment")
        # publishing never reaches the model (no hub here), and says so in one line
        assert_readable(refusal(visitor, text, "me/x", True, "hf_not_a_token", api_name="/publish"))


@refusals_only
def test_odd_hub_ids_go_to_the_hub_and_nowhere_else(world):
    """Anything shaped like org/name is a hub id on a public deployment, never looked up on the
    server's disk: with the hub offline each is refused (offline), and what is not a hub id is
    a local path (refused as one)."""
    visitor = client(world.main)
    relative = os.path.relpath(world.model, REPO)  # org/name-shaped only if it has one slash; both ways covered
    for reference in ("org/name@../../x", "org/name@" + str(world.model), "HuggingFaceTB/SmolLM2-135M-Instruct",
                      "a/b;rm -rf", "org/..", "../org", "org/name@refs/pr/1", relative):
        message = refusal(visitor, recipe(reference, world.demo("json")), api_name="/check_recipe")
        assert_readable(message)
        assert "offline" in message or "local paths are disabled" in message or "hub id" in message, message


def test_a_chat_template_name_is_no_path(world):
    """`chat_template: <name>` picks a built-in template; a name that climbs out of the
    templates folder must not read a server file: not its existence (the answers for a file
    that exists and one that does not must be the same), and not its text."""
    visitor = client(world.main)
    climb = "../" * 24
    found = climb + str(world.canary / "leak")[1:]  # the canary's leak.jinja
    missing = climb + str(world.canary / "nothere")[1:]
    said = {}
    for name in (found, missing, climb + "etc/passwd"):
        text = passthrough(world.demo("json"), chat_template=name)
        for api_name in ("/check_recipe", "/merge"):
            try:
                outcome = visitor.predict(text, api_name=api_name)
            except Exception as error:
                outcome = "refused: " + str(error).replace(name, "<name>")
            said[name, api_name] = outcome
    said_found = {api_name: said[found, api_name] for api_name in ("/check_recipe", "/merge")}
    said_missing = {api_name: said[missing, api_name] for api_name in ("/check_recipe", "/merge")}
    problems = []
    for api_name in ("/check_recipe", "/merge"):
        if not said_found[api_name].startswith("refused"):
            problems.append(f"{api_name} accepted the template file '{found}': {said_found[api_name][:200]}")
        if said_found[api_name] != said_missing[api_name]:
            problems.append(f"{api_name} tells an existing .jinja file from a missing one: "
                            f"{said_found[api_name][:150]!r} vs {said_missing[api_name][:150]!r}")
    if not said_found["/merge"].startswith("refused"):  # the merge holds the file's text: does it reach the visitor?
        try:
            leaked = str(visitor.predict("hello", 2, 0, 0, False, api_name="/ask"))
        except Exception as error:
            leaked = str(error)
        if TEMPLATE_SECRET in leaked:
            problems.append(f"the file's text came back to the visitor through /ask: {leaked[:200]}")
    visitor.close()  # its session (and any model it holds) goes
    assert not problems, "\n".join(problems)


# ---- sizes --------------------------------------------------------------------------------
def alias_bomb() -> str:
    """Nine levels of nine aliases: 360 bytes that stand for 9**10 (3.5 billion) scalars."""
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for level in range(9):
        previous, name = chr(97 + level), chr(98 + level)
        lines.append(f"{name}: &{name} [" + ",".join([f"*{previous}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def timed_refusal(visitor, *args, api_name: str, seconds: float = 20.0) -> str:
    """The refusal's text; `seconds` only guards against a hang on a loaded machine (the alias
    bomb used to take a minute): that the refusal comes before any work shows in its words and
    in the server's memory, not in a stopwatch."""
    started = time.time()
    message = refusal(visitor, *args, api_name=api_name)
    elapsed = time.time() - started
    assert elapsed < seconds, f"{api_name} took {elapsed:.1f} s to refuse: {message}"
    assert_readable(message)
    return message


@refusals_only
def test_recipes_too_big_are_refused_at_once(world):
    visitor = client(world.main)
    started = time.time()
    rss_before = world.main.rss_mb()
    bomb = alias_bomb()
    assert len(bomb) < 400
    for api_name in ("/check_recipe", "/merge", "/moe_build", "/sweep_parameters"):
        assert "aliases expanded" in timed_refusal(visitor, bomb, api_name=api_name)
    quiet = time.time()  # the Sweep tab's own refresh of its choices says nothing, and costs nothing
    visitor.predict(bomb, api_name="/sweep_tab_choices")
    assert time.time() - quiet < 20
    assert world.main.rss_mb() - rss_before < 150, "the alias bomb cost memory"
    assert "nests deeper than 64 levels" in timed_refusal(visitor, "[" * 30_000 + "]" * 30_000,
                                                          api_name="/check_recipe")
    assert "MERGELAB_MAX_RECIPE_BYTES" in timed_refusal(visitor, "[" * 60_000 + "]" * 60_000,
                                                        api_name="/check_recipe")
    assert "MERGELAB_MAX_RECIPE_BYTES" in timed_refusal(visitor, "# padding\n" * 200_000, api_name="/merge")
    source = f"  - sources:\n      - model: {world.demo('json')}\n        layer_range: [0, 1]\n"
    slices = "slices:\n" + source * 10_000 + "merge_method: passthrough\n"
    assert "MERGELAB_MAX_RECIPE_BYTES" in timed_refusal(visitor, slices, api_name="/check_recipe")
    # 300 slices in 5 KB, through one anchor: the slice limit, not the byte limit, answers
    anchored = (f"slices: [&s {{sources: [{{model: {json.dumps(world.demo('json'))}, layer_range: [0, 1]}}]}}, "
                + ", ".join(["*s"] * 299) + "]\nmerge_method: passthrough\n")
    message = timed_refusal(visitor, anchored, api_name="/check_recipe")
    assert "MERGELAB_MAX_SLICES" in message or "MERGELAB_MAX_OUTPUT_LAYERS" in message, message
    nine = moe(world.demo("json"), [world.demo("json"), world.demo("reverse")] * 4 + [world.demo("json")])
    for api_name in ("/moe_build", "/moe_form"):
        assert "MERGELAB_MAX_EXPERTS" in timed_refusal(visitor, nine, api_name=api_name)
    assert world.main.rss_mb() - rss_before < 150
    assert world.peak_since("main", started) < rss_before + 300, "memory jumped while big recipes were refused"


@refusals_only
def test_requests_too_big_are_refused_at_once(world):
    visitor = client(world.main)
    for api_name, arguments in (("/ask", (8, 0, 0, False)), ("/moe_ask", (8, 0, 0))):
        assert "MERGELAB_MAX_PROMPT_CHARS" in timed_refusal(visitor, "x" * 2_000_000, *arguments, api_name=api_name)
    for api_name, arguments in (("/ask", (10**9, 0, 0, False)), ("/moe_ask", (10**9, 0, 0)),
                                ("/ask", (0, 0, 0, False))):
        timed_refusal(visitor, "hello", *arguments, api_name=api_name)
    lab = (f"models:\n  - model: {world.demo('reverse')}\nmerge_method: slerp\nbase_model: {world.demo('json')}\n"
           "parameters: {t: 0.5}\ndtype: float32\n")
    sweep = lambda points, texts, probes=1: (lab, "t", 0, 0, 0, 1, points, texts, None, "", None, [], probes)  # noqa
    timed_refusal(visitor, *sweep(10**6, "hello"), api_name="/sweep")
    assert "MERGELAB_MAX_SCORE_LINES" in timed_refusal(visitor, *sweep(3, "a\n" * 10**5), api_name="/sweep")
    assert "MERGELAB_MAX_SCORE_BYTES" in timed_refusal(visitor, *sweep(3, "word " * 100_000), api_name="/sweep")
    timed_refusal(visitor, *sweep(3, "hello", 10**9), api_name="/sweep")
    # 20 MB where a number belongs, and where a recipe belongs
    timed_refusal(visitor, "9" * 20_000_000, api_name="/restore", seconds=10)
    assert "MERGELAB_MAX_RECIPE_BYTES" in timed_refusal(visitor, "#" * 20_000_000, api_name="/check_recipe",
                                                        seconds=10)
    raw = RawVisitor(world.main.url)  # the builder's dynamic controls, sent 100,000 models
    message = raw.call("apply", [[f"org/m{i}" for i in range(100_000)], world.demo("json"), "slerp"])
    assert "at most 8 models" in error_of(message), message
    found, _ = visitor.predict("x" * 2_000_000, api_name="/search_hub")
    assert "offline" in found and len(found) < 300, found[:300]
    status, body = upload(world.main.url, "texts.txt", b"a line to score\n" * 150_000)  # 2.4 MB
    assert status == 413 and b"a line" not in body, (status, body[:200])


@refusals_only
def test_per_layer_control_points_are_bounded(world):
    """The per-layer boxes turn control points into the recipe: 200,000 of them (1 MB of
    text) must be refused before work, not written into a recipe the server itself refuses."""
    visitor = client(world.main)
    lab = (f"models:\n  - model: {world.demo('reverse')}\nmerge_method: slerp\nbase_model: {world.demo('json')}\n"
           "parameters: {t: 0.5}\ndtype: float32\n")
    points = "0.5," * 200_000
    message = refusal(visitor, lab, points, "0.5", "0.5", api_name="/set_layers")
    assert_readable(message)
    assert "MERGELAB_MAX_" in message, message  # refused by a limit, before the points are used


def test_the_per_layer_parameter_is_only_one_the_recipe_takes(world):
    """The per-layer panel's parameter picker sends a name (`t`, `density@MODEL`): a path, a
    model the recipe lacks, a base's value TIES ignores, a huge name or a number is refused in
    one line, and nothing outside the recipe is opened or written."""
    visitor = client(world.main)
    ties = (f"models:\n  - model: {world.demo('reverse')}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
            f"merge_method: ties\nbase_model: {world.demo('json')}\ndtype: float32\n")
    for parameter, words in [("density@/etc/passwd", "takes no 'density' for '/etc/passwd'"),
                             (f"density@{world.demo('json')}", "takes no 'density'"),
                             ("t", "ties has no 't'"),
                             ("x" * 200_000, "MERGELAB_MAX_")]:
        for api_name, args in [("/set_layers", (ties, "0.5", "0.5", "0.5", parameter)),
                               ("/read_layers", (ties, parameter)),
                               ("/edit_layers", (ties, "0.5", "0.5", "0.5", "MLP", "set", 0, 1, 0.2, parameter))]:
            message = refusal(visitor, *args, api_name=api_name)
            assert_readable(message, words)
            assert len(message) < 2000, message[:200]
    written, _ = visitor.predict(ties, "0, 1", "0.5", "0.5", f"density@{world.demo('reverse')}",
                                 api_name="/set_layers")
    assert "filter: self_attn" in written and "/etc/passwd" not in written


def test_a_sweep_is_checked_whole_before_its_first_merge(world):
    """A sweep from t=0 to t=-1 (every point but the first out of range), and one whose only
    text is too short to score: both are knowable before any work, so both should be refused
    before the first point is merged (and recorded in the history)."""
    visitor = client(world.main)
    lab = (f"models:\n  - model: {world.demo('reverse')}\nmerge_method: slerp\nbase_model: {world.demo('json')}\n"
           "parameters: {t: 0.5}\ndtype: float32\n")
    problems = []
    expected = {-1: "below its minimum 0", 1e308: "above its maximum 1", 1: "the texts are too short"}
    for stop, texts in ((-1, "The cat sat on the mat."), (1e308, "The cat sat on the mat."), (1, "hi")):
        message = refusal(visitor, lab, "t", 0, 0, 0, stop, 3, texts, None, "", None, [], 1, api_name="/sweep")
        assert_readable(message)
        if expected[stop] not in message:
            problems.append(f"from 0 to {stop} over {texts!r}: {message}")
    points = [row for row in visitor.predict(api_name="/history")["data"] if row[2] == "sweep point"]
    if points:
        problems.append(f"{len(points)} point(s) merged and recorded before the refusal: {points}")
    visitor.close()
    assert not problems, "\n".join(problems)


ABSURD: dict = {}  # what the absurd-values test saw, for the test after it


# ---- absurd values --------------------------------------------------------------------------
@refusals_only
def test_absurd_numbers_and_types_are_refused_in_one_line(world):
    """NaN, infinities, 1e308, negatives, strings and lists for every number a visitor can
    send, sent raw (JSON allows no NaN; Python's parser does): each request ends (no hang, no
    crash), and an error from the app's own handler is its own readable line."""
    visitor = RawVisitor(world.main.url)
    lab = (f"models:\n  - model: {world.demo('reverse')}\nmerge_method: slerp\nbase_model: {world.demo('json')}\n"
           "parameters: {t: 0.5}\ndtype: float32\n")
    bad = [float("nan"), float("inf"), -float("inf"), 1e308, -1e308, -1, 2**70, "abc", [1], {"a": 1}, None]
    cases = []
    for value in bad:
        cases += [("set_t", [lab, value]),
                  ("edit_layers", [lab, "0.5", "0.5", "0.5", "attention", "set", value, 3, 1.0]),
                  ("edit_layers", [lab, "0.5", "0.5", "0.5", "MLP", "multiply", 0, value, 1.0]),
                  ("edit_layers", [lab, "0.5", "0.5", "0.5", "attention", "add", 0, 3, value]),
                  ("ask", ["hello", value, 0, 0, False]), ("ask", ["hello", 4, value, 0, False]),
                  ("ask", ["hello", 4, 0, value, False]), ("moe_ask", ["hello", value, value, value]),
                  ("sweep", [lab, "t", 0, 0, value, 1, 3, "hi", None, "", None, [], 1]),
                  ("sweep", [lab, "t", 0, 0, 0, 1, value, "hi", None, "", None, [], 1]),
                  ("sweep", [lab, "t@layers", value, value, 0, 1, 2, "hi", None, "", None, [], 1]),
                  ("sweep", [lab, "t", 0, 0, 0, 1, 2, "hi", None, "", None, [], value]),
                  ("moe_recipe", [world.demo("json"), "random", value, "bfloat16", world.demo("reverse"), "x", ""]
                   + [""] * 9),
                  ("search", [lab, "t", ["json skill"], value, "", 2, 0, "min"]),
                  ("search", [lab, "t", ["json skill"], 2, "", value, 0, "min"]),
                  ("search", [lab, "t", ["json skill"], 2, "", 2, value, "min"]),
                  ("search", [lab, "t", ["json skill"], 2, "", 2, 0, value]),
                  ("search", [lab, value, ["json skill"], 2, "", 2, 0, "min"]),
                  ("restore", [value]), ("sweep_point", [value]), ("search_point", [value]), ("vote", [value])]

    def attempt(case):
        api_name, data = case
        started = time.time()
        message = visitor.another().call(api_name, data, timeout=60)
        return api_name, data, message, time.time() - started

    problems, unexpected = [], []
    with ThreadPoolExecutor(4) as pool:
        for api_name, data, message, elapsed in pool.map(attempt, cases):
            error = error_of(message)
            shown = [d for d in data if not isinstance(d, str) or len(d) < 20]
            if elapsed > 45:  # a hang, not a slow answer: each case is one small request
                problems.append(f"{api_name} with {shown}: {elapsed:.0f} s")
            if message.get("success"):
                continue  # harmless: the value was clipped or ignored (no merge runs without a recipe)
            if "Traceback" in error or "\n" in error.strip():
                problems.append(f"{api_name} with {shown}: {error}")
            if "unexpected error" in error:
                unexpected.append(f"{api_name} with {shown}: {error}")
    ABSURD["unexpected"] = unexpected
    assert world.main.alive()
    assert "output: 30 layers" in client(world.main).predict(lab, api_name="/check_recipe")
    assert not problems, "\n".join(problems)


def test_absurd_values_get_the_apps_own_words_not_unexpected_error(world):
    """The same requests: a value of the wrong type is the visitor's mistake, so its error
    should say what was wrong in the app's words, not 'unexpected error: ValueError: ...'
    (which marks a path the handlers do not check)."""
    if "unexpected" not in ABSURD:
        pytest.skip("runs with test_absurd_numbers_and_types_are_refused_in_one_line")
    assert not ABSURD["unexpected"], "\n".join(ABSURD["unexpected"])


# ---- files --------------------------------------------------------------------------------
@refusals_only
def test_the_file_routes_serve_no_server_file(world):
    session_file = next(world.main.instance_folder().iterdir())  # the instance's lock file
    paths = ["/etc/passwd", str(world.secret), "../../../../../etc/passwd", "..%2F..%2F..%2F..%2Fetc%2Fpasswd",
             "%2Fetc%2Fpasswd", "%252Fetc%252Fpasswd", "....//....//etc/passwd", "//etc/passwd", "file:///etc/passwd",
             "/proc/self/environ", "/proc/self/cmdline", str(REPO / "app.py"), "app.py", "README.md",
             f"{world.demo('json')}/config.json", str(session_file), str(world.main.tmpdir / "gradio"),
             str(world.main.tmpdir / "gradio" / ".." / ".." / "canary" / "secret.txt"),
             os.path.relpath(world.secret, REPO), "~/.bashrc"]
    for path in paths:
        for route in ("/gradio_api/file=", "/file=", "/gradio_api/file/"):
            status, body = http("GET", world.main.url.rstrip("/") + route + path)
            assert status in (403, 404, 405), f"{route}{path}: {status} {body[:100]!r}"
            assert SECRET.encode() not in body and b"root:x:0" not in body and b"import gradio" not in body


@refusals_only
def test_file_data_naming_a_server_path_is_not_read(world):
    """A gr.File input sent as raw FileData with a server path: Gradio must refuse to take it
    as an upload, and the answer must not tell an existing file from a missing one (the app
    would say the file's size)."""
    visitor = RawVisitor(world.main.url)
    lab = (f"models:\n  - model: {world.demo('reverse')}\nmerge_method: slerp\nbase_model: {world.demo('json')}\n"
           "parameters: {t: 0.5}\ndtype: float32\n")
    said = {}
    for path in ("/etc/passwd", str(world.secret), "/etc/no-such-file", "../../../../etc/passwd",
                 str(world.canary / "no-such")):
        for file_data in ({"path": path, "meta": {"_type": "gradio.FileData"}},
                          {"path": path, "url": "file://" + path, "meta": {"_type": "gradio.FileData"}},
                          {"url": f"{world.main.url}gradio_api/file={path}", "path": "x.txt",
                           "meta": {"_type": "gradio.FileData"}}):
            message = visitor.call("sweep", [lab, "t", 0, 0, 0, 1, 2, "", file_data, "", None, [], 1])
            assert not message.get("success"), f"{path} accepted: {message}"
            text = json.dumps(message)
            assert SECRET not in text and "root:x:0" not in text and "bytes" not in error_of(message), text
            error = str((message.get("output") or {}).get("error"))
            said.setdefault(json.dumps(sorted(file_data)), set()).add(error.replace(path, "<path>"))
    for shape, messages in said.items():
        assert len(messages) == 1, f"FileData {shape}: answers differ by file: {messages}"


# ---- one session against another; concurrency; cancellation ------------------------------
@dataclass
class Lab:
    first: object  # gradio_client.Client with a merged model
    second: object  # another visitor
    recipe: str


@pytest.fixture(scope="module")
def lab(world):
    from ui.lab import LAB_RECIPE

    text = LAB_RECIPE.format(**{name: str(path) for name, path in world.family.items()})
    world.phases.append((time.time(), "lab: the first visitor's merge"))
    first, second = client(world.main), client(world.main)
    assert "Merged" in first.predict(text, False, api_name="/merge")
    yield Lab(first, second, text)
    first.close()
    second.close()


POEM = "Write a short poem about the sea."


def test_another_visitor_sees_nothing_of_the_first(world, lab):
    a, b = lab.first, lab.second
    blind = a.predict("Reverse the words: red lamp quiet", 2, 0, 0, True, api_name="/ask")
    assert "pane 1" in blind[3]
    assert_readable(refusal(b, "hello", 2, 0, 0, False, api_name="/ask"), "press Merge first")
    assert_readable(refusal(b, "hello", 2, 0, 0, api_name="/moe_ask"), "press Build first")
    assert_readable(refusal(b, "pane 1", api_name="/vote"), "ask in blind mode first")
    assert "You preferred pane 1" in a.predict("pane 1", api_name="/vote")  # b's vote spent nothing of a's
    ours = a.predict(api_name="/history")["data"]
    assert ours and all(row[2] == "merge" for row in ours)
    assert b.predict(api_name="/history")["data"] == []
    for row in ours:
        assert_readable(refusal(b, row[0], api_name="/restore"), f"no merge #{row[0]} in your history")
    raw = RawVisitor(world.main.url)  # a raw visitor that names a's id, index and choice directly
    for api_name, data in (("restore", [ours[0][0]]), ("sweep_point", [0]), ("vote", ["pane 1"])):
        message = raw.call(api_name, data)
        assert not message.get("success") and lab.recipe not in json.dumps(message), message


def test_the_same_seed_gives_the_same_tokens_whatever_else_runs(world, lab):
    a, b = lab.first, lab.second
    assert "Merged" in b.predict(lab.recipe, False, api_name="/merge")  # merging works for the next visitor
    alone = answers(a.predict(POEM, 16, 1.0, 11, False, api_name="/ask"))
    jobs = [a.submit(POEM, 16, 1.0, 11, False, api_name="/ask"), b.submit(POEM, 16, 1.0, 12, False, api_name="/ask"),
            b.submit(POEM, 16, 1.0, 13, False, api_name="/ask")]
    together, other, third = (answers(job.result(timeout=180)) for job in jobs)
    assert together == alone, f"seed 11 alone: {alone}; with others asking: {together}"
    assert other != alone or third != alone, "other seeds gave the same answers: the seed is not used"
    again = answers(b.predict(POEM, 16, 1.0, 11, False, api_name="/ask"))
    assert again == alone, "the same recipe and seed in another session answer differently"


def test_a_merge_waits_for_the_answer_being_streamed(world, lab):
    a = lab.first
    prompt = "Reverse the words: zebra anchor glove paper lamp"
    before = answers(a.predict(prompt, 48, 0, 0, False, api_name="/ask"))
    streaming = a.submit(prompt, 48, 0, 0, False, api_name="/ask")
    wait_streaming(streaming)
    at_one = lab.recipe.replace("t: 0.5", "t: 1.0")
    merging = a.submit(at_one, False, api_name="/merge")
    streamed = answers(streaming.result(timeout=180))
    merged_first = merging.done()
    status = merging.result(timeout=180)
    assert "Merged" in status, status
    assert streamed == before, f"the answer changed under a merge: {before} -> {streamed}"
    assert not merged_first, "the merge finished while the answer was still streaming"
    after = answers(a.predict(prompt, 48, 0, 0, False, api_name="/ask"))
    assert after[2] == after[1], f"t=1 should answer as model B: {after}"
    long_prompt = "a," * 3500  # 7000 characters (under the limit of 8000), 7000 tokens (over 2048)
    assert_readable(timed_refusal(a, long_prompt, 4, 0, 0, False, api_name="/ask", seconds=5), "2048")


def test_cancelled_asks_and_sweeps_stop_their_work(world, lab):
    a, b = lab.first, lab.second
    pid = world.main.pid
    assert goes_idle(pid, 30)
    assert world.main.busy_threads() == []
    story = a.submit("Write a long story about a dragon who learns to cook.", 256, 1.0, 5, False, api_name="/ask")
    wait_streaming(story)
    streaming = world.main.busy_threads()
    assert any("merging/generation.py" in stack for stack in streaming), streaming  # the generation thread
    story.cancel()
    assert goes_idle(pid, 5), "the server kept generating after the ask was cancelled"
    left = wait_until(lambda: world.main.busy_threads() == [], 5) or world.main.busy_threads()
    assert left is True, "threads still in MergeLab's code after the cancel:\n" + "\n\n".join(left)

    sweep = a.submit(lab.recipe, "t", 0, 0, 0, 1, 6, "The cat sat on the mat.", None, "", None, [], 1,
                     api_name="/sweep")
    assert wait_until(lambda: any("1 of 6" in str(o[2]) for o in sweep.outputs()), 90), sweep.outputs()
    DIRECT.update(try_direct_diagnostics(world, sweep))  # while the sweep holds the heavy queue
    sweep.cancel()
    cancelled_at = time.time()
    assert goes_idle(pid, 20), "the sweep kept merging after it was cancelled"
    left = wait_until(lambda: world.main.busy_threads() == [], 5) or world.main.busy_threads()
    assert left is True, "threads still in MergeLab's code after the cancel:\n" + "\n\n".join(left)
    started = time.time()  # the heavy queue is free again: a heavy request is answered at once
    refusal(b, recipe(str(world.model), world.demo("json")), False, api_name="/merge")
    assert time.time() - started < 15, f"the heavy queue answered {time.time() - started:.1f} s later"
    assert time.time() - cancelled_at < 30
    rows = [r for r in a.predict(api_name="/history")["data"] if r[2] == "sweep point"]
    assert 1 <= len(rows) <= 3, rows


DIRECT: dict = {}  # what a direct POST did while a sweep held the heavy queue


def try_direct_diagnostics(world: World, running) -> dict:
    """POST /gradio_api/run/diagnostics (Gradio's route without the queue) while `running`, a
    heavy job, holds the heavy queue's only slot."""
    text = (f"models:\n  - model: {world.demo('base')}\nmerge_method: slerp\nbase_model: {world.demo('reverse')}\n"
            "parameters: {t: 0.5}\ndtype: float32\n")
    body = json.dumps({"data": [text, "angle_deg"], "session_hash": "direct-caller"}).encode()
    started = time.time()
    status, answer = http("POST", world.main.url.rstrip("/") + "/gradio_api/run/diagnostics", body,
                          {"Content-Type": "application/json"}, timeout=120)
    return {"status": status, "seconds": time.time() - started, "ran": b'"plotly"' in answer,
            "while_busy": not running.done(), "answer": answer[:120]}


def test_direct_http_calls_do_not_skip_the_heavy_queue(world, lab):
    """Gradio also serves every event at POST /gradio_api/run/<api_name>, outside the queue
    (unless the queue is made with api_open=False): a heavy event sent there must not run
    while the one heavy slot is taken, or the heavy queue, its length and its concurrency
    limit bound nothing."""
    if not DIRECT:
        pytest.skip("runs with test_cancelled_asks_and_sweeps_stop_their_work")
    assert not (DIRECT["ran"] and DIRECT["while_busy"]), \
        (f"POST /gradio_api/run/diagnostics ran the diagnostics (HTTP {DIRECT['status']}, "
         f"{DIRECT['seconds']:.1f} s) while a sweep held the heavy queue: {DIRECT['answer']!r}")


def test_a_sweep_is_its_sessions_own(world, lab):
    a, b = lab.first, lab.second
    sweep = a.submit(lab.recipe, "t", 0, 0, 0, 1, 4, "The cat sat on the mat.", None, "", None, [], 1,
                     api_name="/sweep")
    assert wait_until(lambda: any("1 of 4" in str(o[2]) for o in sweep.outputs()), 90), sweep.outputs()
    a.predict(api_name="/sweep_stop")
    plot, table, status, csv_file, choices = sweep.result(timeout=120)
    assert "(stopped)" in status and csv_file, status
    owned = world.main.session_folder(a.session_hash) / "sweep.csv"
    assert owned.is_file() and "history id" in owned.read_text()
    for path in (str(owned), str(owned).replace(world.main.tmpdir.as_posix(), "")):
        status_code, body = get_file(world.main.url, path)
        assert status_code in (403, 404) and b"history id" not in body, (path, status_code, body[:100])
    assert_readable(refusal(b, 0, api_name="/sweep_point"))
    raw = RawVisitor(world.main.url)
    message = raw.call("sweep_point", [0])
    assert not message.get("success") and "parameters" not in json.dumps(message), message
    theirs = {r[0] for r in a.predict(api_name="/history")["data"]}
    mine = {r[0] for r in b.predict(api_name="/history")["data"]}
    assert theirs and not theirs & mine


# ---- the small server: a hub, stages on disk, idle visitors, a full server, a memory budget --
def test_a_private_repo_in_the_shared_cache_is_not_read_without_its_owners_token(world):
    """Another visitor, signed in, brought a private model and a private LoRA adapter into the
    Space's hub cache. An anonymous visitor must not read either: not as a model, and not as
    the adapter of `base+adapter` (huggingface_hub falls back to the cache when the hub says
    no, so the hub must be asked first)."""
    visitor = client(world.small)
    assert "output: 4 layers" in visitor.predict(passthrough("org/base"), api_name="/check_recipe")  # the hub answers
    cannot = "on the Hugging Face hub that you can read"
    assert_readable(refusal(visitor, passthrough("tester/secret"), api_name="/check_recipe"), cannot)
    read = []
    for reference in ("org/base+tester/secret-adapter", f"{world.demo('base')}+tester/secret-adapter"):
        try:
            plan = visitor.predict(passthrough(reference), api_name="/check_recipe")
            read.append(f"{reference}: {plan.splitlines()[2]}")
        except Exception as error:
            assert_readable(str(error), cannot)
    visitor.close()
    assert not read, f"an anonymous visitor read the private adapter from the cache: {read}"


def test_a_merge_over_the_memory_budget_is_refused_before_work(world):
    """240 layers of the demo model in float32 (4 GB) on a server whose budget is 2.5 GB: the
    plan says so before anything is built."""
    server = world.small
    visitor = client(server)
    source = f"{{sources: [{{model: {json.dumps(world.demo('json'))}, layer_range: [0, 30]}}]}}"
    text = "slices: [" + ", ".join([source] * 8) + "]\nmerge_method: passthrough\ndtype: float32\n"
    rss = server.rss_mb()
    message = timed_refusal(visitor, text, False, api_name="/merge", seconds=10)
    assert "MERGELAB_MEMORY_BUDGET" in message and "2.5 GB" in message, message
    assert server.rss_mb() - rss < REFUSAL_GROWTH_MB
    visitor.close()


def test_a_stage_named_like_a_demo_model_stays_in_its_session_folder_which_idle_expiry_removes(world):
    """A raw visitor (no heartbeat) merges a two-stage recipe whose first stage is named
    `smollm2-json`, the demo model's folder name: the stage is written inside its own session
    folder, the demo model is untouched; then the visitor says nothing more, and the idle
    limit frees it: the folder goes."""
    server = world.small
    demo_before = tree_digest(world.family["json"])
    # the session hash is the client's to choose: one shaped like a path into the canary
    visitor = RawVisitor(server.url, session_hash=f"../../../../../../../..{world.canary}/folder")
    text = multi_stage("smollm2-json", world.demo("json"), world.demo("reverse"))
    message = visitor.call("merge", [text, False], timeout=240)
    assert message.get("success"), error_of(message)
    folder = server.session_folder(visitor.session_hash)
    written = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("config.json"))
    assert written and all(p.startswith("stages/") and "smollm2-json" in p for p in written), written
    assert tree_digest(world.family["json"]) == demo_before
    # another visitor cannot name that folder, nor a link out of its own
    other = RawVisitor(server.url)
    stage = next(folder.rglob("config.json")).parent
    message = other.call("check_recipe", [recipe(str(stage), world.demo("json")), False])
    assert "local paths are disabled" in error_of(message), message
    rss_with_session = server.rss_mb()
    assert wait_until(lambda: not folder.exists(), 8 + 45, every=0.5), \
        f"the idle visitor's folder is still there: {sorted(p.name for p in folder.iterdir())}"
    assert server.alive()
    assert server.rss_mb() < rss_with_session, "memory held after the session was freed"


def test_a_link_inside_a_session_folder_leads_nowhere_else(world):
    """Only the program writes in session folders; if a link out were ever made there, the
    check follows it (the folder itself is allowed: a link into the demo models is fine)."""
    server = world.small
    visitor = RawVisitor(server.url)
    folder = server.session_folder(visitor.session_hash)
    folder.mkdir(parents=True)
    try:
        (folder / "out").symlink_to(world.model)
        (folder / "in").symlink_to(world.family["json"])
        message = visitor.call("check_recipe", [recipe(str(folder / "out"), world.demo("json")), False])
        assert "local paths are disabled" in error_of(message), message
        message = visitor.call("check_recipe", [recipe(str(folder / "in"), world.demo("json")), False])
        assert message.get("success"), error_of(message)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_a_full_server_refuses_newcomers_then_frees_the_oldest_idle_visitor(world):
    server = world.small  # two sessions at most
    first, second, third = client(server), client(server), client(server)
    text = passthrough(world.demo("base"))
    try:
        for visitor in (first, second):
            assert "Merged" in visitor.predict(text, False, api_name="/merge")
        story = "Write a long story about a dragon who learns to cook, with many chapters."
        jobs = [v.submit(story, 256, 0.8, 1, False, api_name="/ask") for v in (first, second)]
        for job in jobs:
            wait_streaming(job)
        message = refusal(third, text, False, api_name="/merge")
        busy = [job.done() for job in jobs]
        assert_readable(message, "the server is full")
        assert busy == [False, False], "the asks ended before the newcomer came"
        jobs[0].cancel()
        time.sleep(0.5)
        jobs[1].cancel()
        assert wait_until(lambda: goes_idle(server.pid, 2), 20)
        assert "Merged" in third.predict(text, False, api_name="/merge")  # the oldest idle one made room
        assert_readable(refusal(first, "hello", 2, 0, 0, False, api_name="/ask"), "press Merge first")
        assert last_answer(second.predict("hello", 2, 0, 0, False, api_name="/ask")[1])  # one parent: panes A, merged
    finally:
        for visitor in (first, second, third):
            visitor.close()


# ---- the command line ----------------------------------------------------------------------
def test_the_cli_does_not_believe_a_header_in_a_dry_run(world, tmp_path):
    """A model whose safetensors header claims a [2**31]*4 tensor (more bytes than int64 holds)
    over 8 bytes: `--dry-run` refuses it in one line (exit 2), in little memory.
    (test_cli_safety.py runs the [1e9, 1e9] claim through a real merge.)"""
    folder = tmp_path / "hostile"
    shutil.copytree(world.model, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    header = json.dumps({"w": {"dtype": "F32", "shape": [2**31] * 4, "data_offsets": [0, 8]}}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    config = tmp_path / "recipe.yml"
    config.write_text(passthrough(str(folder), "float32"))
    code, output, peak_kb = run_measured([sys.executable, "-m", "merging", str(config), str(tmp_path / "out"),
                                          "--dry-run"])
    assert code == 2, output
    assert len(output.splitlines()) == 1 and output.startswith("error: ") and "'w'" in output, output
    assert "claims shape" in output, output
    assert peak_kb < 700_000, f"peak RSS {peak_kb} KB"  # torch alone takes about 230 MB
    assert not (tmp_path / "out").exists()


# ---- after everything ------------------------------------------------------------------------
def test_nothing_outside_the_allowed_folders_changed_and_memory_stayed_bounded(world):
    """Runs last: every byte of the canary, the demo cache (the app's history file aside) and
    the hub cache as before; no file added to the working tree; both servers alive, their
    memory within bounds all along."""
    for name, folder in world.watched.items():
        found = changes(world.before[name], tree_digest(folder, skip=HISTORY_FILES))
        assert not found, f"{name} ({folder}) changed: {found[:20]}"
    added = repo_untracked() - world.untracked
    assert not added, f"files appeared in the working tree: {sorted(added)[:20]}"
    assert world.main.alive() and world.small.alive()
    for server in (world.main, world.small):  # nothing of any request still runs
        assert wait_until(lambda: server.busy_threads() == [], 10), "\n\n".join(server.busy_threads())
    for name, bound in (("main", MAIN_RSS_MB), ("small", SMALL_RSS_MB)):
        assert world.peaks.get(name, 0) < bound, \
            f"the {name} server peaked at {world.peaks[name]:.0f} MB; by test (MB): {world.peaks_by_test(name)}"
        grew = [f"{test}: {first:.0f} -> {peak:.0f} MB" for test, first, peak in world.by_test(name)
                if test in REFUSALS_ONLY and peak - first > REFUSAL_GROWTH_MB]
        assert not grew, f"refused requests cost the {name} server memory: {grew}"
    leftovers = [p for p in world.small.session_folders()]
    assert leftovers == [] or all(not any(p.iterdir()) for p in leftovers), leftovers
