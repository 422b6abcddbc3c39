"""The shared pieces each live in one place: chat checks and shapes, atomic files, tensor sizes, default variants."""

from __future__ import annotations

import json
import os

import pytest

from mlflow_slmops import _files
from mlflow_slmops.errors import SlmopsError
from mlflow_slmops.genai import chat, modeldir
from mlflow_slmops.variants import DEFAULT_VARIANTS
from tests.conftest import ROOT


@pytest.mark.parametrize("bad, needle", [([], "non-empty list"), ("hi", "non-empty list"),
                                         ([{"role": "user"}], "message 0 is"),
                                         ([{"role": "user", "content": "a"}, {"role": 1, "content": "b"}],
                                          "message 1 is")])
def test_chat_check_names_the_first_bad_message(bad, needle):
    with pytest.raises(SlmopsError, match=needle):
        chat.check_messages(bad)


def test_chat_check_keeps_only_role_and_content():
    assert chat.check_messages([{"role": "user", "content": "hi", "name": "x"}]) == [{"role": "user", "content": "hi"}]


def test_chat_check_keeps_an_assistants_tool_calls_and_a_tool_results_call_id():
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    checked = chat.check_messages([{"role": "assistant", "content": None, "tool_calls": [call]},
                                   {"role": "tool", "content": "{}", "tool_call_id": "call_1", "name": "f"}])
    assert checked == [{"role": "assistant", "content": "", "tool_calls": [call]},
                       {"role": "tool", "content": "{}", "tool_call_id": "call_1"}]


def test_a_completion_has_the_openai_shape():
    out = chat.completion("m", "Hello", "stop", prompt_tokens=3, completion_tokens=2)
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    assert out["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hello"},
                               "finish_reason": "stop"}]
    assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def test_an_atomic_json_write_replaces_whole_or_leaves_the_old_file(tmp_path):
    path = tmp_path / "deep" / "state.json"
    _files.write_json_atomic(path, {"a": "日本"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"a": "日本"}
    with pytest.raises(TypeError):
        _files.write_json_atomic(path, {"a": object()})  # not serializable: fails mid-write
    assert json.loads(path.read_text(encoding="utf-8")) == {"a": "日本"}
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]  # no temporary file left


def test_link_or_copy_replaces_a_linked_destination_without_writing_through_it(tmp_path):
    src, shared, dst = tmp_path / "src", tmp_path / "shared", tmp_path / "out" / "dst"
    src.write_text("new")
    shared.write_text("old")
    dst.parent.mkdir()
    os.link(shared, dst)
    assert _files.link_or_copy(src, dst) == "hardlink"
    assert dst.read_text() == "new" and shared.read_text() == "old"


@pytest.mark.parametrize("data_type, dims, size", [(1, (3, 4), 48), (16, (5,), 10), (22, (7,), 4), (21, (8, 2), 8),
                                                   (8, (2,), None)])
def test_tensor_bytes_counts_packed_4_bit_types_and_refuses_strings(data_type, dims, size):
    assert modeldir.tensor_bytes(data_type, dims) == size


def test_every_default_variant_list_is_the_one_constant():
    from mlflow.projects._project_spec import load_project

    project = load_project(str(ROOT))
    for entry in ("main", "sweep", "convert"):
        assert project.get_entry_point(entry).parameters["variants"].default == DEFAULT_VARIANTS
