"""The bad-input table: every case runs through the real CLI (`slmops ...`, `mlflow deployments ...`) as a
subprocess and must fail in one line that names the input and the fix, with no traceback, a non-zero
exit, no partial output, and everything that existed before intact.

docs/troubleshooting.md is the catalogue of these cases; each row there names its case here.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlflow
import pytest

from mlflow_slmops import flavor
from mlflow_slmops.deploy.foundry_local import cache as fcache
from mlflow_slmops.track import tracking
from tests.faultkit import (
    copy_warm_cache,
    paths_snapshot,
    read_only_folder,
    store_fingerprint,
    tiny_disk,
)
from tests.helpers import assert_one_line_error, bin_path, mlflow_cli, run_cli

NAME = "qwen"
NO_SUCH_RUN = "0123456789abcdef0123456789abcdef"
# Smaller than the int4 fixture's model.onnx.data (about 210 KB), larger than its small files.
FULL_DISK_SIZE = "160k"
STORE_FILE = "mlflow.db"


@dataclass
class World:
    """What exists before every case: a tracking store with a registered model, a deployment, caches, bad inputs."""

    root: Path
    uri: str
    plain_run_id: str
    hf: Path
    genai: Path
    conv_cache: Path
    foundry_cache: Path
    bad: dict[str, Path] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self.uri, "SLMOPS_CACHE_DIR": str(self.conv_cache)}


@dataclass
class Run:
    """One case, ready to run: its command line, what its error line must say, extra folders to watch."""

    argv: list[str]
    needles: tuple[str, ...]
    watch: list[Path] = field(default_factory=list)


def _truncate_weights(folder: Path) -> None:
    data = folder / "model.onnx.data"
    if not data.exists():  # tiny models may keep weights inline: move them out first
        import onnx

        model = onnx.load(str(folder / "model.onnx"))
        onnx.save_model(model, str(folder / "model.onnx"), save_as_external_data=True, location=data.name,
                        size_threshold=0)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])


def _bad_genai(world_root: Path, genai: Path) -> dict[str, Path]:
    made = {}
    for name in ("truncated", "corrupt-onnx", "empty-genai-config", "symlink-outside"):
        made[name] = Path(shutil.copytree(genai, world_root / f"genai-{name}"))
    _truncate_weights(made["truncated"])
    (made["corrupt-onnx"] / "model.onnx").write_bytes(b"\x08\x07garbage, not a protobuf" * 40)
    (made["empty-genai-config"] / "genai_config.json").write_text("")
    outside = world_root / "outside-tokenizer.json"
    shutil.copy(genai / "tokenizer.json", outside)
    (made["symlink-outside"] / "tokenizer.json").unlink()
    (made["symlink-outside"] / "tokenizer.json").symlink_to(outside)
    return made


def _bad_hf(world_root: Path, hf: Path) -> dict[str, Path]:
    made = {}
    for name in ("corrupt-config", "unsupported-arch"):
        made[name] = Path(shutil.copytree(hf, world_root / f"hf-{name}"))
    (made["corrupt-config"] / "config.json").write_text('{"architectures": ["Qwen2ForCausalLM"], "hidden')
    cfg = json.loads((hf / "config.json").read_text())
    cfg.update(architectures=["BertForMaskedLM"], model_type="bert")
    (made["unsupported-arch"] / "config.json").write_text(json.dumps(cfg))
    return made


def _bad_files(world_root: Path) -> dict[str, Path]:
    files = {
        "qa-bad-line": '{"prompt": "What is MLflow?", "expected": "platform"}\n{"prompt": "Broken", "expected": \n',
        "variants-corrupt": "variants:\n  - name: int4-b64\n    precision: [int4\n",
        "chat-negative-max-tokens": json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": -1}),
    }
    suffix = {"qa-bad-line": ".jsonl", "variants-corrupt": ".yaml", "chat-negative-max-tokens": ".json"}
    made = {}
    for name, text in files.items():
        made[name] = world_root / f"{name}{suffix[name]}"
        made[name].write_text(text)
    return made


@pytest.fixture(scope="module")
def world(tmp_path_factory, hf_qwen, genai_qwen_fp32, genai_qwen_int4, models_root) -> World:
    root = tmp_path_factory.mktemp("bad-input-world")
    uri = f"sqlite:///{root / STORE_FILE}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        # The experiment every command uses, tagged as `slmops` tags it: so a failing command has nothing to add.
        # (Not mlflow.set_experiment: it exports MLFLOW_EXPERIMENT_ID to every later subprocess.)
        exp_id = mlflow.create_experiment(tracking.DEFAULT_EXPERIMENT, tags=dict([tracking.EXPERIMENT_KIND_TAG]),
                                          artifact_location=(root / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=exp_id) as run:
            info = flavor.log_model(genai_qwen_int4, name="model", registered_model_name=NAME)
        mlflow.MlflowClient().set_registered_model_alias(NAME, "champion", info.registered_model_version)
    finally:
        mlflow.set_tracking_uri(previous)
    world = World(root, uri, run.info.run_id, hf_qwen, genai_qwen_int4,
                  copy_warm_cache(models_root, root / "conversion-cache"), root / "foundry-cache")
    world.bad = {**_bad_genai(root, genai_qwen_int4), **_bad_hf(root, hf_qwen), **_bad_files(root)}
    done = mlflow_cli("deployments", "create", "-t", f"foundry-local:{world.foundry_cache}", "--name", NAME,
                      "-m", f"models:/{NAME}@champion", env=world.env)
    assert done.returncode == 0, done.stderr[-3000:]
    return world


def slmops_argv(*args: str) -> list[str]:
    return [bin_path("slmops"), *args]


def deploy_argv(verb: str, cache: Path, *args: str) -> list[str]:
    return [bin_path("mlflow"), "deployments", verb, "-t", f"foundry-local:{cache}", *args]


# --- the cases: each takes the world, the case's own folder and an ExitStack (for mounts) -----------------------

Case = Callable[[World, Path, contextlib.ExitStack], Run]
CASES: dict[str, Case] = {}


def case(fn: Case) -> Case:
    CASES[fn.__name__] = fn
    return fn


def _convert(w: World, out: Path, model: Path, *extra: str) -> list[str]:
    return slmops_argv("convert", "--model", str(model), "--variants", "int4", "--output", str(out), "--quiet", *extra)


def _sweep(w: World, out: Path, *extra: str) -> list[str]:
    return slmops_argv("sweep", "--model", str(w.hf), "--variants", "fp32", "--output", str(out), "--quiet",
                       "--prompt-len", "8", "--repeats", "1", *extra)


@case
def convert_model_folder_missing(w, tmp, stack):
    missing = tmp / "no-such-model"
    return Run(_convert(w, tmp / "out", missing), (f"model folder {missing} does not exist", "pass the Hugging Face"))


@case
def convert_hf_config_json_corrupt(w, tmp, stack):
    model = w.bad["corrupt-config"]
    return Run(_convert(w, tmp / "out", model), (f"{model / 'config.json'} is not valid JSON", "re-save the model"))


@case
def convert_unsupported_architecture(w, tmp, stack):
    model = w.bad["unsupported-arch"]
    return Run(_convert(w, tmp / "out", model), ("architecture 'BertForMaskedLM'", "supported:", "convert a decoder-only"))


@case
def convert_cache_path_is_a_file(w, tmp, stack):
    not_a_folder = tmp / "cache-file"
    not_a_folder.write_text("a user's file")
    return Run(_convert(w, tmp / "out", w.hf, "--cache-dir", str(not_a_folder)),
               (f"conversion cache path {not_a_folder} is a file", "--cache-dir"))


@case
def convert_cache_folder_read_only(w, tmp, stack):
    stack.enter_context(read_only_folder(w.conv_cache))
    return Run(_convert(w, tmp / "out", w.hf, "--cache-dir", str(w.conv_cache)),
               (f"conversion cache {w.conv_cache} is not writable (Read-only file system)", "writable folder"))


@case
def convert_output_disk_full(w, tmp, stack):
    disk = stack.enter_context(tiny_disk(tmp / "disk", FULL_DISK_SIZE))
    (disk / "notes.txt").write_text("a user's file")
    return Run(_convert(w, disk / "out", w.hf, "--cache-dir", str(w.conv_cache)),
               ("every variant failed (int4)", f"No space left on device ({disk / 'out'}", "free disk space"))


@case
def benchmark_genai_weights_truncated(w, tmp, stack):
    folder = w.bad["truncated"]
    return Run(slmops_argv("benchmark", "--model-dir", str(folder), "--quiet"),
               (f"{folder / 'model.onnx.data'} is truncated", "copy or download the model folder again"))


@case
def benchmark_onnx_file_corrupt(w, tmp, stack):
    folder = w.bad["corrupt-onnx"]
    return Run(slmops_argv("benchmark", "--model-dir", str(folder), "--quiet"),
               (f"{folder / 'model.onnx'} is not a readable ONNX model", "re-export the model folder"))


@case
def evaluate_genai_config_empty(w, tmp, stack):
    folder = w.bad["empty-genai-config"]
    return Run(slmops_argv("evaluate", "--model-dir", str(folder), "--quiet"),
               (f"genai_config.json {folder / 'genai_config.json'} is not valid JSON", "re-export the model folder"))


@case
def evaluate_qa_file_bad_line(w, tmp, stack):
    qa = w.bad["qa-bad-line"]
    return Run(slmops_argv("evaluate", "--model-dir", str(w.genai), "--qa", str(qa), "--quiet"),
               (f"QA file {qa} line 2 is not valid JSON", "write one JSON object per line"))


@case
def sweep_resume_run_not_found(w, tmp, stack):
    return Run(slmops_argv("sweep", "--resume", NO_SUCH_RUN, "--quiet"),
               (f"sweep run {NO_SUCH_RUN} was not found", "pass the run ID `slmops sweep` printed"))


@case
def sweep_variants_file_corrupt(w, tmp, stack):
    bad = w.bad["variants-corrupt"]
    return Run(_sweep(w, tmp / "out", "--variants-file", str(bad), "--cache-dir", str(w.conv_cache)),
               (f"variants file {bad} is not valid YAML or JSON", "write a YAML or JSON file"))


@case
def sweep_qa_file_bad_line(w, tmp, stack):
    qa = w.bad["qa-bad-line"]
    return Run(_sweep(w, tmp / "out", "--qa", str(qa), "--cache-dir", str(w.conv_cache)),
               (f"QA file {qa} line 2 is not valid JSON", "write one JSON object per line"))


@case
def sweep_cache_folder_read_only(w, tmp, stack):
    stack.enter_context(read_only_folder(w.conv_cache))
    return Run(_sweep(w, tmp / "out", "--cache-dir", str(w.conv_cache)),
               (f"conversion cache {w.conv_cache} is not writable", "--cache-dir"))


@case
def promote_sweep_run_not_found(w, tmp, stack):
    return Run(slmops_argv("promote", "--sweep-run-id", NO_SUCH_RUN, "--name", NAME),
               (f"sweep run {NO_SUCH_RUN} was not found", "pass the run ID `slmops sweep` printed"))


@case
def promote_run_is_not_a_sweep(w, tmp, stack):
    return Run(slmops_argv("promote", "--sweep-run-id", w.plain_run_id, "--name", NAME),
               (f"run {w.plain_run_id} is not a sweep run", "pass the parent run ID that `slmops sweep` printed"))


@case
def deploy_create_name_with_slash(w, tmp, stack):
    return Run(deploy_argv("create", w.foundry_cache, "--name", "team/qwen", "-m", f"models:/{NAME}@champion"),
               ("'team/qwen' contains a path separator", "use only letters, digits"))


@case
def deploy_create_model_uri_not_found(w, tmp, stack):
    uri = f"runs:/{NO_SUCH_RUN}/model"
    return Run(deploy_argv("create", w.foundry_cache, "--name", "other", "-m", uri),
               (f"model URI {uri} does not resolve to a model", "check the registered model name"))


@case
def deploy_create_registry_alias_not_found(w, tmp, stack):
    uri = f"models:/{NAME}@no-such-alias"
    return Run(deploy_argv("create", w.foundry_cache, "--name", "other", "-m", uri),
               (f"model URI {uri} does not resolve to a model", "alias"))


@case
def deploy_create_cache_path_is_a_file(w, tmp, stack):
    not_a_folder = tmp / "cache-file"
    not_a_folder.write_text("a user's file")
    return Run(deploy_argv("create", not_a_folder, "--name", "other", "-m", f"models:/{NAME}@champion"),
               (f"the Foundry cache path {not_a_folder} is a file", "point -t foundry-local:/path at a folder"))


@case
def deploy_create_cache_folder_read_only(w, tmp, stack):
    stack.enter_context(read_only_folder(w.foundry_cache))
    return Run(deploy_argv("create", w.foundry_cache, "--name", "other", "-m", f"models:/{NAME}@champion"),
               ("Read-only file system; nothing was deployed", "choose a writable cache folder"))


@case
def deploy_create_disk_full(w, tmp, stack):
    disk = stack.enter_context(tiny_disk(tmp / "disk", FULL_DISK_SIZE))
    (disk / "notes.txt").write_text("a user's file")
    return Run(deploy_argv("create", disk / "foundry", "--name", NAME, "-m", f"models:/{NAME}@champion"),
               (f"cannot write {disk / 'foundry'}", "No space left on device; nothing was deployed", "free disk space"))


@case
def deploy_update_name_with_dotdot(w, tmp, stack):
    return Run(deploy_argv("update", w.foundry_cache, "--name", "..", "-m", f"models:/{NAME}@champion"),
               ("'..' contains a path separator, '..' or NUL", "use only letters, digits"))


@case
def deploy_update_temperature_not_a_number(w, tmp, stack):
    return Run(deploy_argv("update", w.foundry_cache, "--name", NAME, "-C", "temperature=warm"),
               ("-C temperature='warm' is not a number", "-C temperature=0.7"))


@case
def deploy_update_max_length_negative(w, tmp, stack):
    return Run(deploy_argv("update", w.foundry_cache, "--name", NAME, "-C", "max_length=-5"),
               ("-C max_length=-5 must be at least 1", "pass an integer >= 1"))


@case
def deploy_delete_name_with_leading_dash(w, tmp, stack):
    return Run(deploy_argv("delete", w.foundry_cache, "--name", "-rf"),
               ("'-rf' has characters Foundry model IDs do not allow", "starting with a letter or digit"))


@case
def deploy_predict_name_of_300_characters(w, tmp, stack):
    return Run(deploy_argv("predict", w.foundry_cache, "--name", "q" * 300, "-I", str(w.bad["chat-negative-max-tokens"])),
               ("has 300 characters, at most 200", "use a shorter name"))


@case
def deploy_predict_deployment_not_found(w, tmp, stack):
    return Run(deploy_argv("predict", w.foundry_cache, "--name", "no-such-deployment",
                           "-I", str(w.bad["chat-negative-max-tokens"])),
               ("deployment no-such-deployment was not found", "mlflow deployments list"))


@case
def deploy_predict_negative_max_tokens(w, tmp, stack):
    return Run(deploy_argv("predict", w.foundry_cache, "--name", NAME, "-I", str(w.bad["chat-negative-max-tokens"])),
               ("max_tokens=-1 must be at least 1", "pass an integer >= 1"))


@case
def log_model_weights_truncated(w, tmp, stack):
    folder = w.bad["truncated"]
    return Run(slmops_argv("log-model", "--model-dir", str(folder)),
               (f"{folder / 'model.onnx.data'} is truncated", "copy or download the model folder again"))


@case
def log_model_symlink_outside_the_folder(w, tmp, stack):
    folder = w.bad["symlink-outside"]
    return Run(slmops_argv("log-model", "--model-dir", str(folder)),
               (f"symlink {folder / 'tokenizer.json'} points outside the model folder", "remove the symlink"))


def _without_lock_files(snap: dict | None) -> dict | None:
    """The Foundry runtime takes its own catalog lock when it starts: an empty file that its scanner ignores and
    reuses, so it is not counted as output. Our per-name deploy lock is counted: a failed deploy removes it."""
    if snap is None:
        return None
    locks = [k for k in snap if k.endswith(".lock") and not k.endswith(fcache.LOCK_SUFFIX)
             and snap[k][:1] == (0,)]
    holders = {str(Path(k).parent) + "/" for k in locks} | {str(p) + "/" for k in locks for p in Path(k).parents}
    only_locks = {d for d in holders if all(k in locks or k in holders for k in snap if k.startswith(d))}
    return {k: v for k, v in snap.items() if k not in locks and k not in only_locks}


def _watched(world: World, tmp: Path, extra: list[Path]) -> dict[str, dict | None]:
    """Everything a case could touch: the world's folders (the store as a user sees it) and the case's own."""
    snaps = {str(p): _without_lock_files(paths_snapshot(p)) for p in [tmp, *extra]}
    for child in world.root.iterdir():
        if not child.name.startswith(STORE_FILE):  # the sqlite file is compared by its content below
            snaps[str(child)] = _without_lock_files(paths_snapshot(child))
    snaps["store"] = store_fingerprint(world.uri)
    return snaps


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_fails_in_one_line_naming_input_and_fix_and_changes_nothing(name, world, tmp_path):
    with contextlib.ExitStack() as stack:
        run = CASES[name](world, tmp_path, stack)
        before = _watched(world, tmp_path, run.watch)
        done = run_cli(run.argv, env=world.env, cwd=str(tmp_path))
        after = _watched(world, tmp_path, run.watch)
    print(f"\n{name}: {done.stderr.strip().splitlines()[-1]}")
    assert_one_line_error(done, *run.needles)
    assert "Traceback" not in done.stdout + done.stderr
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("Error")]
    assert len(errors) == 1, done.stderr
    assert "; " in errors[0], f"no fix after the message: {errors[0]}"
    assert after == before


def test_nul_byte_in_a_deployment_name_from_python_is_refused_in_one_line(tmp_path):
    """The command line cannot carry a NUL (arguments are C strings), so the case is driven the other way a
    name reaches the plugin: Python code calling the deployment client."""
    from mlflow.deployments import get_deploy_client

    from mlflow_slmops.errors import SlmopsError

    cache = tmp_path / "foundry-cache"
    client = get_deploy_client(f"foundry-local:{cache}")
    for call in (lambda: client.create_deployment("qwen\x00evil", "models:/qwen@champion"),
                 lambda: client.delete_deployment("qwen\x00evil"),
                 lambda: client.predict("qwen\x00evil", {"messages": [{"role": "user", "content": "Hi"}]})):
        with pytest.raises(SlmopsError) as caught:
            call()
        text = str(caught.value)
        assert "\n" not in text and "'qwen\\\\0evil' contains a path separator, '..' or NUL" in text, text
        assert "use only letters, digits" in text
    assert not cache.exists()
