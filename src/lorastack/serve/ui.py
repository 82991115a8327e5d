"""The Gradio chat UI, mounted at ``/ui`` on the same server as the API.

It talks to the engine directly (no HTTP hop) through the same admission path as ``/v1``, so UI
users batch together with API clients. Adapter dropdown (refreshed from the store on page load and on
demand), system prompt, max tokens / temperature / top-p, streamed replies, multi-turn history.
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phone-home from a private server

import gradio as gr

from .api import APIError, start_generation
from .engine import SamplingParams


def _text(content: Any) -> str:
    """Text of a Gradio message content (a string, a list of parts, or a component dict)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text") or ""
    if isinstance(content, (list, tuple)):
        return "".join(_text(c) for c in content)
    return ""


def model_choices(state) -> list[str]:
    """The dropdown's choices: the base model first, then every compatible adapter by name."""
    return [card["id"] for card in state.model_cards()]


def build_ui(state) -> gr.Blocks:
    """The chat UI over ``state`` (a ``ServerState``)."""

    async def respond(message, history, model, system, max_tokens, temperature, top_p):
        msgs: list[dict[str, str]] = []
        if system and system.strip():
            msgs.append({"role": "system", "content": system.strip()})
        for h in history or []:
            role = h.get("role") if isinstance(h, dict) else None
            if role in ("user", "assistant"):
                text = _text(h.get("content"))
                if text:
                    msgs.append({"role": role, "content": text})
        msgs.append({"role": "user", "content": _text(message)})
        params = SamplingParams(max_tokens=0, temperature=float(temperature), top_p=float(top_p))
        try:
            greq, sink, _ = await start_generation(state, model or state.base_model_id, msgs, params, int(max_tokens))
        except APIError as exc:
            raise gr.Error(exc.message) from None
        reply = ""
        try:
            while True:
                ev = await sink.queue.get()
                if ev.kind == "delta":
                    reply += ev.text
                    yield reply
                elif ev.kind == "error":
                    raise gr.Error("The server failed while generating; see its log.")
                else:
                    if not reply:
                        yield "(empty reply)"
                    return
        finally:
            if not greq.finished:  # the browser went away or the user pressed stop
                greq.cancel()

    def refresh(current=None):
        """Re-read the store; keep the user's pick if it still exists, else preselect the first adapter."""
        choices = model_choices(state) if state.engine is not None else [state.base_model_id]
        if current not in choices:
            current = choices[1] if len(choices) > 1 else choices[0]
        return gr.Dropdown(choices=choices, value=current)

    with gr.Blocks(title="lorastack chat") as demo:
        gr.Markdown("## lorastack chat\nChat with the base model or any adapter in the store.")
        with gr.Row():
            model = gr.Dropdown(
                choices=[state.base_model_id],
                value=state.base_model_id,
                label="Model / adapter",
                elem_id="adapter",
                scale=5,
            )
            refresh_btn = gr.Button("Refresh adapters", scale=1, elem_id="refresh")
        system = gr.Textbox(label="System prompt", lines=2, elem_id="system")
        with gr.Accordion("Generation settings", open=False):
            max_tokens = gr.Slider(1, 2048, value=256, step=1, label="Max tokens", elem_id="max_tokens")
            temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature", elem_id="temperature")
            top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p", elem_id="top_p")
        gr.ChatInterface(
            respond,
            additional_inputs=[model, system, max_tokens, temperature, top_p],
            textbox=gr.Textbox(
                placeholder="Type a message...", show_label=False, elem_id="chat-input", submit_btn=True, max_lines=8
            ),
            concurrency_limit=None,  # the engine's queue bounds the load, and batches UI users together
        )
        demo.load(refresh, outputs=model)
        refresh_btn.click(refresh, inputs=model, outputs=model)
    return demo
