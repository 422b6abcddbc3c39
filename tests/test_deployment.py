"""The foundry-local deployment target, through the real `mlflow deployments` CLI and the real Foundry Local runtime.

Every runtime check runs in a fresh subprocess (the runtime is a per-process singleton): the CLI itself, or a
small script that drives foundry-local-sdk directly, the way a user's own app would. The models are logged once
per module into one tracking store; independent CLI calls run side by side (each `mlflow` start costs seconds).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.deployments import get_deploy_client

from devkit.toymodel import CHATML_TEMPLATE, LLAMA3_TEMPLATE
from mlflow_slmops import flavor
from mlflow_slmops.deploy.foundry_local import cache as fcache
from mlflow_slmops.deploy.foundry_local import config as fconfig
from mlflow_slmops.deploy.foundry_local import prompt_template
from mlflow_slmops.errors import SlmopsError
from mlflow_slmops.genai import modeldir
from tests.helpers import (
    assert_one_line_error,
    bin_path,
    mlflow_cli,
    stop_process,
    tree_snapshot,
)

ROOT = Path(__file__).resolve().parents[1]
NAME = "qwen-support"
PUBLISHER = fconfig.DEFAULT_PUBLISHER
CATALOG_FILES = ("foundry.local.modelinfo.json", "foundry.local.modelinfo.lock")  # the runtime's own catalog
WAIT_S = 300  # a generous deadline for a subprocess to reach a point; never a timing assertion
MISTRAL_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + "
                    "' [/INST]' }}{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")
PHI3_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ '<|system|>\\n' + m['content'] + '<|end|>\\n' }}"
                 "{% elif m['role'] == 'user' %}{{ '<|user|>\\n' + m['content'] + '<|end|>\\n' }}"
                 "{% else %}{{ '<|assistant|>\\n' + m['content'] + '<|end|>\\n' }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}")

# A user's own app on the cache: foundry-local-sdk directly, in a fresh process.
SDK_CHAT = r"""
import json, sys
from foundry_local_sdk import (CatalogType, ChatSession, Configuration, FoundryLocalManager, MessageItem, Request,
                               RequestOptions, SearchOptions)
cache, model_id = sys.argv[1], sys.argv[2]
FoundryLocalManager.initialize(Configuration(app_name="mlflow-slmops", model_cache_dir=cache))
catalog = FoundryLocalManager.instance.get_catalog(CatalogType.LOCAL)
# list_models() gives one model per alias; its variants are every registered version.
out = {"ids": sorted(v.id for m in catalog.list_models() for v in m.variants)}
model = catalog.get_model_variant(model_id) if model_id in out["ids"] else None
if model is not None:
    out["path"] = model.get_path()
    model.load()
    with ChatSession(model) as session:
        session.set_options(RequestOptions(search=SearchOptions(max_output_tokens=6)))
        with Request().add_item(MessageItem.user("What is MLflow?")) as req, session.process_request(req) as resp:
            out["completion_tokens"] = resp.get_usage().completion_tokens
    model.unload()
print(json.dumps(out))
"""


class EchoModel(mlflow.pyfunc.PythonModel):
    """A plain pyfunc model: not onnx_genai, so the target must refuse it."""

    def predict(self, context, model_input: list[str], params=None) -> list[str]:
        return model_input


# --- helpers -----------------------------------------------------------------------------------------------------


def sdk_view(cache: Path, model_id: str) -> dict:
    done = subprocess.run([sys.executable, "-c", SDK_CHAT, str(cache), model_id], capture_output=True, text=True,
                          timeout=WAIT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def scanner_view(cache: Path) -> list[Path]:
    """Folders Foundry Local's cache scanner lists (local_model_scanner.cc): under a publisher folder, with
    genai_config.json and an inference_model.json holding a string Name, and no download.tmp."""
    visible = []
    for pub in (p for p in cache.iterdir() if p.is_dir()):
        for root, dirs, files in os.walk(pub):
            if {"genai_config.json", "inference_model.json"} <= set(files) and "download.tmp" not in files:
                try:
                    name = json.loads((Path(root) / "inference_model.json").read_text()).get("Name")
                except ValueError:
                    name = None
                if isinstance(name, str):
                    visible.append(Path(root))
                    dirs.clear()  # it does not recurse into a model folder
    return visible


def assert_complete(folder: Path) -> None:
    """A visible folder is a whole model: every file there, the weights those the provenance names."""
    modeldir.check_genai_dir(folder)
    prov = json.loads((folder / fcache.PROVENANCE_FILE).read_text())
    assert modeldir.weights_hash(folder) == prov["weights_sha256"]


def all_paths(root: Path) -> dict[str, tuple]:
    """Files with size and mtime, and folders, to prove nothing at all was written."""
    if not root.is_dir():
        return {}
    paths: dict[str, tuple] = dict(tree_snapshot(root))
    paths.update({str(p.relative_to(root)) + "/": () for p in root.rglob("*") if p.is_dir()})
    return paths


def deploy_args(verb: str, cache: Path, name: str, *args: str) -> list[str]:
    return [bin_path("mlflow"), "deployments", verb, "-t", f"foundry-local:{cache}", "--name", name, *args]


def deploy_cli(verb: str, cache: Path, name: str, *args: str) -> subprocess.CompletedProcess:
    return mlflow_cli(*deploy_args(verb, cache, name, *args)[1:])


def run_side_by_side(commands: dict[str, list[str]]) -> dict[str, subprocess.CompletedProcess]:
    """Run independent CLI commands at once; each result as subprocess.run would give it."""
    procs = {key: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for key, cmd in commands.items()}
    results = {}
    for key, proc in procs.items():
        out, err = proc.communicate(timeout=WAIT_S * 2)
        results[key] = subprocess.CompletedProcess(commands[key], proc.returncode, out, err)
    return results


def wait_for(predicate, proc: subprocess.Popen | None = None, what: str = "condition") -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} before {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def search_of(folder: Path) -> dict:
    return json.loads((folder / "genai_config.json").read_text())["search"]


def model_dir(cache: Path, version: int, name: str = NAME) -> Path:
    return cache / PUBLISHER / f"{name}-{version}"


def _foreign_model(folder: Path, source: Path, model_id: str) -> None:
    """A model folder someone else put in the cache: no provenance of ours."""
    shutil.copytree(source, folder)
    (folder / "inference_model.json").write_text(json.dumps({"Name": model_id, "PromptTemplate": None}))


def _log_with_template(genai_dir: Path, work: Path, template: str | None, experiment_id: str) -> str:
    folder = work / f"templated-{uuid.uuid4().hex[:6]}"
    shutil.copytree(genai_dir, folder)
    (folder / "chat_template.jinja").unlink()
    if template is not None:
        (folder / "chat_template.jinja").write_text(template)
    with mlflow.start_run(experiment_id=experiment_id):
        return flavor.log_model(folder, name="model").model_uri


# --- fixtures ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry(tmp_path_factory, genai_qwen_int4, genai_llama_fp32):
    """One tracking store for the module, for this process and the CLIs it starts:
    qwen-support version 1 (Qwen, ChatML; alias champion) and version 2 (Llama-3), plus the models the
    bad-input tests deploy: a plain pyfunc model, one with an unmappable chat template, one with none."""
    root = tmp_path_factory.mktemp("deploy-registry")
    patch = pytest.MonkeyPatch()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    patch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("deploy", artifact_location=(root / "artifacts").as_uri())
    for genai in (genai_qwen_int4, genai_llama_fp32):
        with mlflow.start_run(experiment_id=exp):
            flavor.log_model(genai, name="model", registered_model_name=NAME)
    MlflowClient().set_registered_model_alias(NAME, "champion", "1")
    with mlflow.start_run(experiment_id=exp):
        pyfunc_uri = mlflow.pyfunc.log_model(name="model", python_model=EchoModel()).model_uri
    yield SimpleNamespace(
        uri=uri, pyfunc=pyfunc_uri, unmappable=_log_with_template(genai_qwen_int4, root, MISTRAL_TEMPLATE, exp),
        no_template=_log_with_template(genai_qwen_int4, root, None, exp),
    )
    patch.undo()
    mlflow.set_tracking_uri(None)


@pytest.fixture()
def cache(tmp_path) -> Path:
    return tmp_path / "foundry-cache"


# --- create, and what the real runtime then sees ----------------------------------------------------------------


def test_create_via_cli_writes_only_its_folder_and_a_fresh_foundry_local_process_lists_loads_and_answers_it(
        registry, cache, genai_qwen_int4):
    source_search = search_of(genai_qwen_int4)
    artifacts = Path(MlflowClient().get_model_version_download_uri(NAME, "1"))
    artifacts_before = tree_snapshot(artifacts)
    _foreign_model(cache / "Microsoft" / "phi-4-mini-generic-cpu-1", genai_qwen_int4, "phi-4-mini-generic-cpu:1")
    _foreign_model(cache / PUBLISHER / "other-model-1", genai_qwen_int4, "other-model:1")
    (cache / "notes.txt").write_text("a user's file")
    cache_before = tree_snapshot(cache)

    done = deploy_cli("create", cache, NAME, "-m", f"models:/{NAME}@champion", "-C", "temperature=0.2",
                      "-C", "max_length=512")
    assert done.returncode == 0, done.stderr
    assert f"onnx_genai deployment {NAME} is created" in done.stdout
    cache_after = tree_snapshot(cache)
    changed = {p for p in set(cache_before) | set(cache_after) if cache_before.get(p) != cache_after.get(p)}
    outside = {p for p in changed if not p.startswith(f"{PUBLISHER}/{NAME}") and p not in CATALOG_FILES}
    assert changed and outside == set(), outside
    assert all(p in cache_after for p in cache_before), "a file was removed"

    folder = model_dir(cache, 1)
    view = sdk_view(cache, f"{NAME}:1")
    assert view["ids"] == [f"{NAME}:1"]
    assert Path(view["path"]) == folder
    assert view["completion_tokens"] > 0

    assert search_of(folder)["temperature"] == 0.2 and search_of(folder)["max_length"] == 512
    assert search_of(genai_qwen_int4) == source_search, "the source model was changed"
    assert tree_snapshot(artifacts) == artifacts_before, "the registered model's artifacts were changed"
    inference = json.loads((folder / "inference_model.json").read_text())
    assert inference["Name"] == f"{NAME}:1"
    assert inference["PromptTemplate"]["prompt"] == "<|im_start|>user\n{Content}<|im_end|>\n<|im_start|>assistant\n"
    assert (folder / "chat_template.jinja").is_file()
    prov = json.loads((folder / fcache.PROVENANCE_FILE).read_text())
    assert prov["source_uri"] == f"models:/{NAME}@champion" and prov["registered_model_version"] == "1"
    assert prov["weights_sha256"] == modeldir.weights_hash(genai_qwen_int4)
    # Weights are hardlinked from the artifact store (same filesystem); genai_config.json is a file of its own.
    assert prov["link_mode"] == "hardlink" and (folder / "model.onnx").stat().st_nlink > 1
    assert (folder / "genai_config.json").stat().st_nlink == 1
    assert folder in scanner_view(cache)


def test_run_local_serves_chat_completions_over_http_until_sigint(registry, cache, tmp_path):
    import openai

    out_path, err_path = tmp_path / "run-local.out", tmp_path / "run-local.err"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(deploy_args("run-local", cache, NAME, "-m", f"models:/{NAME}/1"),
                                stdout=out, stderr=err, text=True, start_new_session=True)
    try:
        wait_for(lambda: "model ID:" in out_path.read_text(), proc, "run-local to print its URL")
        lines = out_path.read_text().splitlines()
        base_url = next(ln.split("base URL:")[1].strip() for ln in lines if "base URL:" in ln)
        model_id = next(ln.split("model ID:")[1].strip() for ln in lines if "model ID:" in ln)
        assert base_url.endswith("/catalogs/local/v1") and model_id == f"{NAME}:1"
        client = openai.OpenAI(base_url=base_url, api_key="unused")
        reply = client.chat.completions.create(model=model_id, max_tokens=5,
                                               messages=[{"role": "user", "content": "What is MLflow?"}])
        assert reply.usage.completion_tokens > 0 and reply.choices[0].message.role == "assistant"
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=WAIT_S) == 0, err_path.read_text()[-3000:]
        assert "Stopped" in out_path.read_text()
    finally:
        stop_process(proc)


# --- the other CLI operations ------------------------------------------------------------------------------------


def test_predict_list_get_update_delete_through_the_mlflow_cli(registry, cache, tmp_path):
    assert deploy_cli("create", cache, NAME, "-m", f"models:/{NAME}/1", "-C", "temperature=0.2").returncode == 0

    request = tmp_path / "chat.json"
    request.write_text(json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": "What is MLflow?"}], "max_tokens": 4}))
    target = f"foundry-local:{cache}"
    ran = run_side_by_side({
        "predict": [bin_path("mlflow"), "deployments", "predict", "-t", target, "--name", NAME, "-I", str(request)],
        "list": [bin_path("mlflow"), "deployments", "list", "-t", target],
        "get": deploy_args("get", cache, NAME),
    })
    assert all(r.returncode == 0 for r in ran.values()), {k: r.stderr[-2000:] for k, r in ran.items()}
    completion = json.loads(ran["predict"].stdout.strip().splitlines()[-1])
    assert completion["object"] == "chat.completion" and completion["model"] == f"{NAME}:1"
    assert completion["choices"][0]["message"]["role"] == "assistant"
    assert 0 < completion["usage"]["completion_tokens"] <= 4
    assert f"'model_id': '{NAME}:1'" in ran["list"].stdout
    fields = dict(ln.split(": ", 1) for ln in ran["get"].stdout.splitlines() if ": " in ln)
    assert fields["model_id"] == f"{NAME}:1" and fields["registered_model_version"] == "1"
    assert fields["source_uri"] == f"models:/{NAME}/1" and Path(fields["path"]) == model_dir(cache, 1)
    assert int(fields["size_bytes"]) == modeldir.dir_size_bytes(model_dir(cache, 1))
    assert fields["registered_in_foundry_catalog"] == "True"

    # Settings only: the same model ID is swapped in place, earlier settings kept.
    done = deploy_cli("update", cache, NAME, "-C", "top_p=0.9")
    assert done.returncode == 0, done.stderr
    assert search_of(model_dir(cache, 1))["temperature"] == 0.2 and search_of(model_dir(cache, 1))["top_p"] == 0.9

    done = deploy_cli("update", cache, NAME, "-m", f"models:/{NAME}/2", "-C", "top_k=5")
    assert done.returncode == 0, done.stderr
    assert "is updated (with flavor onnx_genai)" in done.stdout
    assert not model_dir(cache, 1).exists()
    new = model_dir(cache, 2)
    assert "<|start_header_id|>" in json.loads((new / "inference_model.json").read_text())["PromptTemplate"]["prompt"]
    assert search_of(new)["top_k"] == 5 and search_of(new)["top_p"] == 0.9
    view = sdk_view(cache, f"{NAME}:2")
    assert view["ids"] == [f"{NAME}:2"] and view["completion_tokens"] > 0  # version 1 was unregistered

    assert deploy_cli("delete", cache, NAME).returncode == 0
    assert not new.exists() and scanner_view(cache) == []
    assert sdk_view(cache, f"{NAME}:2")["ids"] == []
    get_deploy_client(target).delete_deployment(NAME)  # idempotent: nothing left, no error


PREDICT_DEFAULTS = r"""
import json, sys
from mlflow.deployments import get_deploy_client
client, name = get_deploy_client(sys.argv[1]), sys.argv[2]
ask = [{"role": "user", "content": "What is MLflow?"}]
out = {key: client.predict(deployment_name=name, inputs={"messages": ask, **opts}) for key, opts in {
    "greedy-1": {"seed": 1}, "greedy-2": {"seed": 2},
    "sampled-1": {"seed": 1, "do_sample": True, "max_tokens": 24},
    "sampled-2": {"seed": 2, "do_sample": True, "max_tokens": 24},
    "long": {"messages": [{"role": "user", "content": "MLflow tracks runs. " * 300}]},
}.items()}
print(json.dumps(out))
"""


def test_predict_without_max_tokens_fits_the_context_and_keeps_the_models_greedy_search(registry, cache, tmp_path):
    # Foundry Local asks for 2048 output tokens unless told, more than this 2048-token model has room for;
    # and it samples unless told, whatever genai_config.json says. Both defaults come from the deployed folder.
    done = deploy_cli("create", cache, NAME, "-m", f"models:/{NAME}/1", "-C", "do_sample=false",
                      "-C", "temperature=1.5")
    assert done.returncode == 0, done.stderr
    context = json.loads((model_dir(cache, 1) / "genai_config.json").read_text())["model"]["context_length"]
    assert context <= 2048
    ran = subprocess.run([sys.executable, "-c", PREDICT_DEFAULTS, f"foundry-local:{cache}", NAME],
                         capture_output=True, text=True, timeout=WAIT_S)
    assert ran.returncode == 0, ran.stderr[-3000:]
    out = json.loads(ran.stdout.strip().splitlines()[-1])
    text = {k: v["choices"][0]["message"]["content"] for k, v in out.items()}
    assert text["greedy-1"] == text["greedy-2"], "do_sample=false must not depend on the seed"
    assert text["sampled-1"] != text["sampled-2"], "do_sample=true in the request must sample"
    long = out["long"]["usage"]
    assert long["prompt_tokens"] > 1000
    assert long["prompt_tokens"] + long["completion_tokens"] <= context
    assert all(v["usage"]["completion_tokens"] > 0 for v in out.values())


def test_help_prints_the_config_key_reference_that_docs_deploy_md_holds():
    done = mlflow_cli("deployments", "help", "-t", "foundry-local")
    assert done.returncode == 0, done.stderr
    table = fconfig.key_reference()
    assert table in done.stdout
    assert table in (ROOT / "docs" / "deploy.md").read_text()
    for key in fconfig.KEY_NAMES:
        assert f"`{key}`" in done.stdout


# --- safety --------------------------------------------------------------------------------------------------------


def test_kill_during_deploy_leaves_old_deployment_intact_and_no_half_model_visible(registry, cache, tmp_path):
    assert deploy_cli("create", cache, NAME, "-m", f"models:/{NAME}/1").returncode == 0
    err_path = tmp_path / "update.err"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(deploy_args("update", cache, NAME, "-m", f"models:/{NAME}/2"),
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
                                env={**os.environ, fcache.PAUSE_ENV: str(tmp_path / "never-released")})
    try:
        wait_for(lambda: "paused before commit" in err_path.read_text(), proc, "the update to pause")
        staging = [p for p in (cache / PUBLISHER).iterdir() if fcache.STAGING_TAG in p.name]
        assert len(staging) == 1 and (staging[0] / "model.onnx.data").is_file()  # the weights are in place
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=WAIT_S)
    finally:
        stop_process(proc)

    visible = scanner_view(cache)
    assert visible == [model_dir(cache, 1)]
    for folder in visible:
        assert_complete(folder)
    view = sdk_view(cache, f"{NAME}:1")
    assert view["ids"] == [f"{NAME}:1"] and view["completion_tokens"] > 0

    done = deploy_cli("update", cache, NAME, "-m", f"models:/{NAME}/2")  # the next deploy cleans up
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (cache / PUBLISHER).iterdir() if p.is_dir()) == [f"{NAME}-2"]


def test_concurrent_deploys_of_one_name_exactly_one_wins_the_other_reports_the_lock(registry, cache, tmp_path):
    release, err_path = tmp_path / "release", tmp_path / "first.err"
    with open(err_path, "w") as err:
        first = subprocess.Popen(deploy_args("create", cache, NAME, "-m", f"models:/{NAME}/1"),
                                 stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
                                 env={**os.environ, fcache.PAUSE_ENV: str(release)})
    try:
        wait_for(lambda: "paused before commit" in err_path.read_text(), first, "the first deploy to pause")
        second = deploy_cli("create", cache, NAME, "-m", f"models:/{NAME}/1")
        assert_one_line_error(second, f"deployment {NAME} is being written by another process")
        release.touch()
        assert first.wait(timeout=WAIT_S) == 0, err_path.read_text()[-3000:]
    finally:
        stop_process(first)
    assert scanner_view(cache) == [model_dir(cache, 1)]
    assert sdk_view(cache, f"{NAME}:1")["ids"] == [f"{NAME}:1"]


def test_delete_and_create_never_touch_a_same_named_folder_without_provenance(registry, cache, genai_qwen_int4):
    _foreign_model(model_dir(cache, 1), genai_qwen_int4, f"{NAME}:1")
    _foreign_model(cache / "Custom" / f"{NAME}-1", genai_qwen_int4, f"{NAME}:1")
    before = all_paths(cache)

    get_deploy_client(f"foundry-local:{cache}").delete_deployment(NAME)
    created = deploy_cli("create", cache, NAME, "-m", f"models:/{NAME}/1")
    assert_one_line_error(created, "was not deployed by mlflow-slmops")
    assert all_paths(cache) == before


def test_weights_are_hardlinked_on_one_filesystem_and_copied_across_filesystems(genai_qwen_fp32, tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the temporary folder")
    source = tmp_path / "src"
    shutil.copytree(genai_qwen_fp32, source)
    data = next(f for f in modeldir.check_genai_dir(source).onnx_files if f.endswith(".data"))
    same = tmp_path / "same"
    other = shm / f"slmops-test-{uuid.uuid4().hex[:8]}"
    try:
        for dst in (same, other):
            dst.mkdir()
            mode = fcache.link_or_copy(source / data, dst / data)
            assert (dst / data).read_bytes() == (source / data).read_bytes()
            assert mode == ("hardlink" if dst == same else "copy")
        assert (same / data).stat().st_ino == (source / data).stat().st_ino
        assert (other / data).stat().st_nlink == 1
    finally:
        shutil.rmtree(other, ignore_errors=True)


def test_a_write_that_fails_midway_leaves_no_partial_output(registry, tmp_path):
    """A disk that fills up during the copy (here: a file-size limit, on a cache on another filesystem)."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem, so the weights are copied")
    shm_cache = shm / f"slmops-test-{uuid.uuid4().hex[:8]}"
    limit = 100 * 1024  # below the size of model.onnx, above every small file

    def small_files_only():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    try:
        done = subprocess.run(deploy_args("create", shm_cache, NAME, "-m", f"models:/{NAME}/1"),
                              capture_output=True, text=True, preexec_fn=small_files_only, timeout=WAIT_S)
        assert_one_line_error(done, "nothing was deployed")
        left = {str(p.relative_to(shm_cache)) for p in shm_cache.rglob("*")} if shm_cache.exists() else set()
        assert left <= set(CATALOG_FILES), left  # not even our lock file or the publisher folder
    finally:
        shutil.rmtree(shm_cache, ignore_errors=True)


# --- bad input via the real CLI --------------------------------------------------------------------------------


def test_bad_input_via_the_cli_is_one_line_error_and_writes_nothing(registry, tmp_path):
    v1 = f"models:/{NAME}/1"
    cases = {  # case: (arguments after the target, what the error line must name)
        "name_with_slash": (["--name", "team/qwen", "-m", v1], "team/qwen"),
        "name_with_dotdot": (["--name", "..escape", "-m", v1], "'..'"),
        "model_uri_that_does_not_exist": (["--name", NAME, "-m", "models:/no-such-model@champion"], "no-such-model"),
        "model_that_is_not_onnx_genai": (["--name", NAME, "-m", registry.pyfunc], "not onnx_genai"),
        "chat_template_that_cannot_be_mapped": (["--name", NAME, "-m", registry.unmappable], "cannot be mapped"),
        "temperature_not_a_number": (["--name", NAME, "-m", v1, "-C", "temperature=warm"], "temperature"),
        "negative_max_length": (["--name", NAME, "-m", v1, "-C", "max_length=-5"], "max_length"),
        "cache_path_that_is_a_file": (["--name", NAME, "-m", v1], "is a file"),
    }
    caches, before = {}, {}
    for case in cases:
        caches[case] = tmp_path / case
        caches[case].mkdir()
        (caches[case] / "notes.txt").write_text("a user's file")
        before[case] = all_paths(caches[case])
    target = {case: caches[case] / "notes.txt" if case == "cache_path_that_is_a_file" else caches[case]
              for case in cases}
    ran = run_side_by_side({case: [bin_path("mlflow"), "deployments", "create", "-t", f"foundry-local:{target[case]}",
                                   *args] for case, (args, _) in cases.items()})
    failures = []
    for case, (_, needle) in cases.items():
        try:
            assert_one_line_error(ran[case], needle)
            assert all_paths(caches[case]) == before[case], "something was written"
        except AssertionError as exc:
            failures.append(f"{case}: {exc}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("case", ["model_without_chat_template", "max_length_beyond_context", "unknown_config_key"])
def test_more_bad_input_is_refused_before_anything_is_written(case, registry, cache):
    from mlflow_slmops.deploy.foundry_local import FoundryLocalDeploymentError

    uri, config, needle = f"models:/{NAME}/1", {}, ""
    if case == "model_without_chat_template":
        uri, needle = registry.no_template, "add chat_template.jinja"
    elif case == "max_length_beyond_context":
        config, needle = {"max_length": "99999"}, "context length 2048"
    else:
        config, needle = {"temprature": "0.2"}, "temprature"
    client = get_deploy_client(f"foundry-local:{cache}")
    with pytest.raises(FoundryLocalDeploymentError, match=needle) as raised:
        client.create_deployment(NAME, uri, config=config)
    assert isinstance(raised.value, mlflow.exceptions.MlflowException)
    assert not cache.exists()


def test_prompt_template_key_overrides_an_unmappable_chat_template(registry, cache):
    override = {"prompt": "[INST] {Content} [/INST]", "assistant": "{Content}"}
    done = deploy_cli("create", cache, NAME, "-m", registry.unmappable, "-C", f"prompt_template={json.dumps(override)}")
    assert done.returncode == 0, done.stderr
    folder = model_dir(cache, 1)
    assert json.loads((folder / "inference_model.json").read_text())["PromptTemplate"] == {
        "system": None, "user": None, **override}
    assert (folder / "chat_template.jinja").read_text() == MISTRAL_TEMPLATE  # what the 2.x runtime formats with


# --- the pieces, in-process (no runtime) -----------------------------------------------------------------------


@pytest.mark.parametrize("template, start", [
    (CHATML_TEMPLATE, "<|im_start|>user\n"),
    (LLAMA3_TEMPLATE, "<|start_header_id|>user<|end_header_id|>\n\n"),
    (PHI3_TEMPLATE, "<|user|>\n"),
])
def test_prompt_template_is_derived_for_chatml_llama3_and_phi3(template, start):
    tokens = {"bos_token": "<s>", "eos_token": "</s>"}
    pieces = prompt_template.derive(template, tokens)
    assert pieces["user"].startswith(start) and pieces["prompt"].startswith(pieces["user"])
    # Filled in, the pieces give exactly what the model's own template renders (after any BOS).
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
            {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"}]
    rendered = prompt_template.render(template, msgs, True, tokens)
    rebuilt = "".join(pieces[k].replace("{Content}", m["content"])
                      for k, m in zip(("system", "user", "assistant", "prompt"), msgs))
    assert rendered.endswith(rebuilt) and rendered[: -len(rebuilt)] in ("", "<s>")


def test_prompt_template_refuses_a_template_whose_messages_do_not_compose():
    # ChatML markers, but assistant turns are dropped: mapping it would silently change what the model sees.
    drops_assistant = ("{% for m in messages %}{% if m['role'] != 'assistant' %}{{ '<|im_start|>' + m['role'] + '\\n' "
                       "+ m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}{{ '<|im_start|>assistant\\n' }}")
    for template in (drops_assistant, MISTRAL_TEMPLATE):
        with pytest.raises(SlmopsError, match="cannot be mapped"):
            prompt_template.derive(template, {})


@pytest.mark.parametrize("name", ["a/b", "a\\b", "..", "x..y", "-rf", "/abs", "nul\x00", "a" * 201, "", "sp ace", "q:1"])
def test_names_that_could_escape_the_cache_or_break_foundry_ids_are_refused(name):
    with pytest.raises(SlmopsError):
        fcache.validate_name(name)


def test_valid_names_pass():
    for name in ("qwen-support", "Qwen2.5_0.5b", "a", "a" * 200):
        assert fcache.validate_name(name) == name


@pytest.mark.parametrize("key, value", [("temperature", "0"), ("temperature", "nan"), ("top_p", "1.5"),
                                        ("top_k", "0"), ("top_k", "2.5"), ("repetition_penalty", "-1"),
                                        ("max_length", "0"), ("do_sample", "maybe"), ("version", "01"),
                                        ("version", "-1"), ("publisher", "a/b"), ("port", "70000"),
                                        ("prompt_template", '{"user": "no prompt key {Content}"}'),
                                        ("prompt_template", '{"prompt": "no placeholder"}')])
def test_config_values_out_of_range_are_refused(key, value):
    with pytest.raises(SlmopsError, match=key):
        fconfig.parse_config({key: value})


def test_config_strings_become_typed_settings():
    parsed = fconfig.parse_config({"temperature": "0.7", "top_p": "0.9", "top_k": "40", "max_length": "2048",
                                   "repetition_penalty": "1.1", "do_sample": "true", "version": "3",
                                   "publisher": "Custom"})
    assert parsed.search == {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "max_length": 2048,
                             "repetition_penalty": 1.1, "do_sample": True}
    assert parsed.version == 3 and parsed.publisher == "Custom"


def test_default_target_is_the_foundry_cli_cache_location_else_home(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert fcache.cache_dir_from_target("foundry-local") == tmp_path / "home" / ".foundry" / "cache" / "models"
    fake = tmp_path / "bin" / "foundry"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho '💾 Cache directory path: {tmp_path / 'elsewhere'}'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake.parent))
    assert fcache.cache_dir_from_target("foundry-local") == tmp_path / "elsewhere"
    assert fcache.cache_dir_from_target("foundry-local:/abs/cache") == Path("/abs/cache")
    with pytest.raises(SlmopsError, match="absolute"):
        fcache.cache_dir_from_target("foundry-local:relative/cache")


def test_plugin_module_has_exactly_one_deployment_client_class():
    from mlflow.deployments.plugin_manager import DeploymentPlugins

    plugin = DeploymentPlugins()["foundry-local"]  # MLflow's own checks: one client class, run_local, target_help
    assert plugin.FoundryLocalDeploymentClient.__name__ == "FoundryLocalDeploymentClient"
