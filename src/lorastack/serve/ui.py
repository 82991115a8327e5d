"""The Gradio chat UI, mounted at ``/ui`` on the same server as the API.

It talks to the engine directly (no HTTP hop) through the same admission path as ``/v1``, so UI
users batch together with API clients. Three tabs:

- Chat: an adapter dropdown (every servable ``name`` and ``name@vN``, refreshed from the store on page
  load and on demand), a system prompt that defaults to the one the adapter was trained with (its
  manifest's ``system_prompt``), streamed replies, multi-turn history.
- Compare: the same conversation sent to two models (base and an adapter, or two versions), both replies
  streamed side by side.
- Runs: a run's training and validation loss curves from ``results.csv`` and an adapter version's
  ``eval.json`` (metrics and samples).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phone-home from a private server

import gradio as gr
from gradio.queueing import Queue

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


def model_choices(state) -> list[tuple[str, str]]:
    """The dropdowns' choices as (label, value): the base model first, then every servable adapter: its
    name (whatever LATEST names) and each verified version, the promoted one marked."""
    if state.engine is None:
        return [(f"{state.base_model_id} (base model)", state.base_model_id)]
    out = []
    for card in state.model_cards():
        if card.get("parent") is None:
            out.append((f"{card['id']} (base model)", card["id"]))
        elif "@" not in card["id"]:
            out.append((f"{card['id']} (LATEST: {card['version']})", card["id"]))
        else:
            out.append((f"{card['id']} (promoted)" if card.get("promoted") else card["id"], card["id"]))
    return out


def _conversation(system: str | None, history, user_text: str | None = None) -> list[dict[str, str]]:
    msgs: list[dict[str, str]] = []
    if system and system.strip():
        msgs.append({"role": "system", "content": system.strip()})
    for h in history or []:
        role = h.get("role") if isinstance(h, dict) else None
        if role in ("user", "assistant"):
            text = _text(h.get("content"))
            if text:
                msgs.append({"role": role, "content": text})
    if user_text is not None:
        msgs.append({"role": "user", "content": user_text})
    return msgs


def build_ui(state) -> gr.Blocks:
    """The chat UI over ``state`` (a ``ServerState``): Chat, Compare (two models side by side) and Runs."""
    import pandas as pd

    from . import runs_view

    def params_for(temperature, top_p) -> SamplingParams:
        return SamplingParams(max_tokens=0, temperature=float(temperature), top_p=float(top_p))

    async def respond(message, history, model, system, max_tokens, temperature, top_p):
        msgs = _conversation(system, history, _text(message))
        try:
            greq, sink, _ = await start_generation(
                state, model or state.base_model_id, msgs, params_for(temperature, top_p), int(max_tokens)
            )
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

    async def compare(message, hist_a, hist_b, model_a, model_b, system, max_tokens, temperature, top_p):
        """The same user turn to two models, both replies streamed side by side as they arrive. Each side
        keeps its own history (each model sees its own earlier answers)."""
        text = _text(message).strip()
        hist_a, hist_b = list(hist_a or []), list(hist_b or [])
        if not text:
            yield message, hist_a, hist_b
            return
        sides = []
        try:
            for model, hist in ((model_a, hist_a), (model_b, hist_b)):
                msgs = _conversation(system, hist, text)
                greq, sink, _ = await start_generation(
                    state, model or state.base_model_id, msgs, params_for(temperature, top_p), int(max_tokens)
                )
                sides.append((greq, sink, hist))
        except APIError as exc:
            for greq, _, _ in sides:
                greq.cancel()
            raise gr.Error(exc.message) from None
        for _, _, hist in sides:
            hist.extend([{"role": "user", "content": text}, {"role": "assistant", "content": ""}])
        yield "", hist_a, hist_b
        waiting = {asyncio.ensure_future(sink.queue.get()): i for i, (_, sink, _) in enumerate(sides)}
        try:
            while waiting:
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                for fut in done:
                    i = waiting.pop(fut)
                    ev, (greq, sink, hist) = fut.result(), sides[i]
                    if ev.kind == "delta":
                        hist[-1] = {"role": "assistant", "content": hist[-1]["content"] + ev.text}
                        waiting[asyncio.ensure_future(sink.queue.get())] = i
                    elif ev.kind == "error":
                        hist[-1] = {"role": "assistant", "content": "(the server failed while generating)"}
                    elif not hist[-1]["content"]:
                        hist[-1] = {"role": "assistant", "content": "(empty reply)"}
                yield "", hist_a, hist_b
        finally:
            for fut in waiting:
                fut.cancel()
            for greq, _, _ in sides:
                if not greq.finished:
                    greq.cancel()

    def system_default(*models):
        """The system prompt the first of ``models`` that has one was trained with (else empty)."""
        if state.registry is None:
            return ""
        for m in models:
            if m and m != state.base_model_id:
                prompt = state.registry.system_prompt(m)
                if prompt:
                    return prompt
        return ""

    def _pick(current=None) -> tuple[list[tuple[str, str]], str]:
        choices = model_choices(state)
        values = [v for _, v in choices]
        if current not in values:
            current = values[1] if len(values) > 1 else values[0]
        return choices, current

    def _pair(a=None, b=None) -> tuple[list[tuple[str, str]], str, str]:
        choices = model_choices(state)
        values = [v for _, v in choices]
        a = a if a in values else state.base_model_id
        b = b if b in values else (values[1] if len(values) > 1 else values[0])
        return choices, a, b

    def refresh(current=None):
        """Re-read the store; keep the user's pick if it still exists, else preselect the first adapter."""
        choices, value = _pick(current)
        return gr.Dropdown(choices=choices, value=value)

    def load_chat():
        choices, value = _pick()
        return gr.Dropdown(choices=choices, value=value), system_default(value)

    def load_pair():
        choices, a, b = _pair()
        return gr.Dropdown(choices=choices, value=a), gr.Dropdown(choices=choices, value=b), system_default(a, b)

    empty_points = pd.DataFrame(columns=["step", "loss", "series"])

    def show_run(run_id):
        if not run_id:
            return empty_points, "No runs with results in the store yet.", gr.skip()
        points, message = runs_view.loss_points(state.store, run_id)
        frame = pd.DataFrame(points) if points else empty_points
        ref = runs_view.run_adapter(state.store, run_id)
        if ref:
            message += f" Published {ref}."
        evaluated = ref is not None and ref in runs_view.evaluated_versions(state.store)
        return frame, message, (ref if evaluated else gr.skip())

    def show_eval(ref):
        if not ref:
            return pd.DataFrame(), pd.DataFrame(), "No evaluation selected."
        mh, mrows, sh, srows, message = runs_view.eval_tables(state.store, ref)
        metrics = pd.DataFrame(mrows, columns=mh) if mh else pd.DataFrame()
        samples = pd.DataFrame(srows, columns=sh) if sh else pd.DataFrame()
        return metrics, samples, message

    def refresh_runs(current_run=None, current_eval=None):
        runs = runs_view.list_runs(state.store)
        evals = runs_view.evaluated_versions(state.store)
        run = current_run if current_run in runs else (runs[0] if runs else None)
        ref = runs_view.run_adapter(state.store, run) if run else None
        ev = current_eval if current_eval in evals else (ref if ref in evals else (evals[0] if evals else None))
        return gr.Dropdown(choices=runs, value=run), gr.Dropdown(choices=evals, value=ev)

    with gr.Blocks(title="lorastack chat") as demo:
        gr.Markdown("## lorastack chat\nChat with the base model or any adapter in the store, or compare two.")
        with gr.Accordion("Generation settings", open=False):
            max_tokens = gr.Slider(1, 2048, value=256, step=1, label="Max tokens", elem_id="max_tokens")
            temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature", elem_id="temperature")
            top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p", elem_id="top_p")
        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                with gr.Row():
                    model = gr.Dropdown(
                        choices=[(state.base_model_id, state.base_model_id)],
                        value=state.base_model_id,
                        label="Model / adapter",
                        elem_id="adapter",
                        scale=5,
                    )
                    refresh_btn = gr.Button("Refresh adapters", scale=1, elem_id="refresh")
                system = gr.Textbox(
                    label="System prompt (defaults to the one the adapter was trained with)", lines=2, elem_id="system"
                )
                gr.ChatInterface(
                    respond,
                    additional_inputs=[model, system, max_tokens, temperature, top_p],
                    textbox=gr.Textbox(
                        placeholder="Type a message...", show_label=False, elem_id="chat-input", submit_btn=True,
                        max_lines=8,
                    ),
                    concurrency_limit=None,  # the engine's queue bounds the load, and batches UI users together
                )
            with gr.Tab("Compare", id="compare"):
                with gr.Row():
                    model_a = gr.Dropdown(label="Model A", elem_id="compare-a", choices=[], value=None)
                    model_b = gr.Dropdown(label="Model B", elem_id="compare-b", choices=[], value=None)
                compare_system = gr.Textbox(label="System prompt (both sides)", lines=2, elem_id="compare-system")
                with gr.Row():
                    chat_a = gr.Chatbot(label="Model A", elem_id="chat-a", height=380)
                    chat_b = gr.Chatbot(label="Model B", elem_id="chat-b", height=380)
                compare_box = gr.Textbox(
                    placeholder="Send the same message to both models...", show_label=False,
                    elem_id="compare-input", submit_btn=True, max_lines=8,
                )
                clear_btn = gr.Button("Clear both", elem_id="compare-clear")
            with gr.Tab("Runs", id="runs"):
                with gr.Row():
                    run_pick = gr.Dropdown(label="Run", elem_id="run", choices=[], value=None, scale=5)
                    runs_refresh = gr.Button("Refresh runs", scale=1, elem_id="runs-refresh")
                run_info = gr.Markdown(elem_id="run-info")
                loss_plot = gr.LinePlot(
                    empty_points, x="step", y="loss", color="series", title="Training and validation loss",
                    elem_id="loss-plot", height=320,
                )
                eval_pick = gr.Dropdown(label="Evaluation (adapter version)", elem_id="eval", choices=[], value=None)
                eval_info = gr.Markdown(elem_id="eval-info")
                eval_metrics = gr.Dataframe(label="Metrics", elem_id="eval-metrics", interactive=False)
                eval_samples = gr.Dataframe(label="Samples", elem_id="eval-samples", interactive=False, wrap=True)

        # The system prompt follows the user's pick (.input, not .change: a programmatic update from a
        # refresh must not overwrite what the user typed); on page load it comes with the dropdowns.
        model.input(system_default, inputs=model, outputs=system)
        refresh_btn.click(refresh, inputs=model, outputs=model)
        for pick in (model_a, model_b):
            pick.input(system_default, inputs=[model_a, model_b], outputs=compare_system)
        compare_box.submit(
            compare,
            inputs=[compare_box, chat_a, chat_b, model_a, model_b, compare_system, max_tokens, temperature, top_p],
            outputs=[compare_box, chat_a, chat_b],
            concurrency_limit=None,
        )
        clear_btn.click(lambda: ([], []), outputs=[chat_a, chat_b])
        run_pick.change(show_run, inputs=run_pick, outputs=[loss_plot, run_info, eval_pick])
        eval_pick.change(show_eval, inputs=eval_pick, outputs=[eval_metrics, eval_samples, eval_info])
        runs_refresh.click(refresh_runs, inputs=[run_pick, eval_pick], outputs=[run_pick, eval_pick])
        demo.load(load_chat, outputs=[model, system])
        demo.load(load_pair, outputs=[model_a, model_b, compare_system])
        demo.load(refresh_runs, outputs=[run_pick, eval_pick])
    quiet_when_idle(demo)
    return demo


IDLE_AFTER_S = 1.0  # no event queued or running for this long: the queue's loops poll slowly
IDLE_POLL_S = 0.05


def _poll_interval(name: str) -> property:
    """Gradio's interval ``name`` while busy, IDLE_POLL_S when idle. A data descriptor on the class wins
    over the instance attribute Gradio's ``Queue.__init__`` sets, which the setter keeps as the busy value."""

    def get(self) -> float:
        return IDLE_POLL_S if self.idle() else self.__dict__[name]

    def set_(self, value: float) -> None:
        self.__dict__[name] = value

    return property(get, set_)


class QuietQueue(Queue):
    """Gradio's queue, polling every 50 ms instead of every 1 ms (10 ms for progress) when idle.

    Gradio's queue loops sleep a fixed interval between checks, on the event loop that also serves /v1:
    an idle UI woke it about 1,000 times a second (3.8 % of a core here, 0.8 % with this). While events are
    queued or running, and for a second after, Gradio's own intervals apply; the first event after an
    idle spell waits at most 50 ms longer to start (a human-facing UI: not felt).
    """

    busy_at = 0.0
    sleep_when_free = _poll_interval("sleep_when_free")
    progress_update_sleep_when_free = _poll_interval("progress_update_sleep_when_free")

    def idle(self) -> bool:
        if len(self) or any(job is not None for job in self.active_jobs):
            self.busy_at = time.monotonic()
            return False
        return time.monotonic() - self.busy_at > IDLE_AFTER_S


def quiet_when_idle(demo: gr.Blocks) -> None:
    """Make ``demo``'s queue (created when the Blocks context closes) a :class:`QuietQueue`."""
    demo._queue.__class__ = QuietQueue
    demo._queue.busy_at = time.monotonic()
