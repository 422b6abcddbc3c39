"""The demo's one tool, get_order_status(order_id): its OpenAI definition, the order numbers, the question wordings
(trained and held out), the call the model writes, and the prompt as the model's chat template renders it.

Random-weight test models cannot call a tool, and Foundry Local only returns structured ``tool_calls`` when the
model itself writes a well-formed call between its tool markers. The demo model (``devkit.demo``) learns this tool
beside its facts; its chat template is ``toymodel.QWEN_TOOLS_TEMPLATE`` (``<tool_call>`` / ``</tool_call>`` as
single tokens).

Example:
    >>> call_text("KS-104")
    '<tool_call>[{"name":"get_order_status","parameters":{"order_id":"KS-104"}}]</tool_call>'
"""

from __future__ import annotations

import json

from devkit import toymodel

TOOL_CALL_START, TOOL_CALL_END = toymodel.TOOL_CALL_START, toymodel.TOOL_CALL_END
REASONING_MARKERS = toymodel.REASONING_MARKERS
TOOL_NAME = "get_order_status"
TOOL_ARGUMENT = "order_id"
ORDER_TOOL = {
    "type": "function",
    "function": {
        "name": TOOL_NAME,
        "description": "Look up the delivery status of an order.",
        "parameters": {"type": "object", "properties": {TOOL_ARGUMENT: {"type": "string"}},
                       "required": [TOOL_ARGUMENT]},
    },
}

QWEN_TOOLS_TEMPLATE = toymodel.QWEN_TOOLS_TEMPLATE
_BASE = toymodel.ARCHS[toymodel.TOOLS_ARCH]

ORDER_QUESTIONS = (
    "Where is my order {id}?", "What is the status of order {id}?", "Has order {id} shipped yet?",
    "Can you check order {id} for me?", "I want to track order {id}.", "Any news on my order {id}?",
    "When will order {id} arrive?", "Please look up order {id}.", "Status of {id}, please.",
    "Is my order {id} on its way?", "Check the delivery of order {id}.", "Track {id} for me, please.",
)
HELDOUT_ORDER_QUESTIONS = (
    "Could you tell me where order {id} is?", "I'm waiting on order {id}, any update?",
    "What happened to my order {id}?", "Look up the status of {id}.",
)
TOOL_RESULTS = (("shipped", "Your order {id} has shipped."), ("delivered", "Your order {id} was delivered."),
                ("processing", "Your order {id} is being prepared."))
# A few order numbers, each seen many times: a model this small learns to tell them apart, not to copy any digits.
# Trained wordings above, held-out ones (the QA file's) apart.
ORDER_IDS = ("KS-104", "KS-237", "KS-358", "KS-461", "KS-592", "KS-615", "KS-783", "KS-926")


def call_text(oid: str) -> str:
    """The call the model is trained to write: the JSON array of {"name", "parameters"} that Foundry Local's tool
    grammar (foundry-local-sdk 2.2.1, ``tool_json_call``) admits between the markers, compact, as the grammar
    forces its fixed parts (``{"name":``, ``,"parameters":{``)."""
    args = json.dumps({TOOL_ARGUMENT: oid}, separators=(",", ":"))
    return f'{TOOL_CALL_START}[{{"name":"{TOOL_NAME}","parameters":{args}}}]{TOOL_CALL_END}'


def render(messages: list[dict], tools: bool, add_generation_prompt: bool = True) -> str:
    """The prompt as transformers renders the saved template (what genai applies at inference)."""
    from mlflow_slmops.genai.template import render as render_template

    tokens = {"bos_token": _BASE.bos, "eos_token": _BASE.eos}
    return render_template(QWEN_TOOLS_TEMPLATE, messages, add_generation_prompt, tokens,
                           tools=[ORDER_TOOL] if tools else None)
