"""The page: the form, the buttons and what they call, and the API endpoints (for gradio_client)."""

from __future__ import annotations

import gradio as gr

from streamer.engine.suggest import format_ignore, suggest_ignore
from streamer.quant.schemes import accepted_presets
from streamer.web import settings
from streamer.web.auth import on_load, whoami_api
from streamer.web.convert import cancel, cancel_ui, run_convert, run_convert_ui
from streamer.web.plan import plan, plan_ui
from streamer.web.progress import progress_html
from streamer.web.suggestions import apply_suggestion, describe_scheme, fill_extra_names, suggest, suggest_ui
from streamer.web.tables import FUSED_COLUMNS, SHARD_COLUMNS, TENSOR_COLUMNS, WARNING_COLUMNS
from streamer.web.wording import CREATE_PR_LABEL, SKIP_INCOMPATIBLE_LABEL

# Only the theme's variables (gradio sets them for light and dark): no hard-coded backgrounds or
# text colours, so every box stays readable in both themes. color-mix tints a box with the theme's
# own accent over whatever the page background is.
CSS = """
.streamer-error { background: var(--error-background-fill); border: 1px solid var(--error-border-color);
  color: var(--error-text-color); border-radius: 8px; padding: 10px 14px; white-space: normal; }
.streamer-error a { color: inherit; text-decoration: underline; }
.streamer-done, .streamer-cancelled { border-radius: 8px; padding: 10px 14px; color: var(--body-text-color); }
.streamer-done { background: color-mix(in srgb, var(--color-green-500) 14%, var(--background-fill-primary));
  border: 1px solid color-mix(in srgb, var(--color-green-500) 60%, var(--background-fill-primary)); }
.streamer-cancelled { background: color-mix(in srgb, var(--color-yellow-500) 14%, var(--background-fill-primary));
  border: 1px solid color-mix(in srgb, var(--color-yellow-500) 60%, var(--background-fill-primary)); }
.streamer-done a, .streamer-cancelled a { color: var(--link-text-color); }
.streamer-cmd { background: var(--code-background-fill); color: var(--body-text-color); padding: 8px 12px;
  border-radius: 6px; overflow-x: auto; }
.streamer-target { margin: 8px 0; }
.streamer-quality svg { max-width: 100%; height: auto; }
.streamer-card pre { max-height: 24em; overflow: auto; white-space: pre-wrap; background: var(--background-fill-secondary);
  color: var(--body-text-color); padding: 8px 12px; border-radius: 6px; }
.streamer-progress { font-variant-numeric: tabular-nums; color: var(--body-text-color); }
.streamer-progress .sp-head { font-weight: 600; margin-bottom: 6px; }
.streamer-progress .sp-row { display: grid; grid-template-columns: 6.5em 1fr 12em 7em 7em; gap: 10px;
  align-items: center; margin: 4px 0; }
.streamer-progress .sp-bar { height: 12px; background: var(--background-fill-secondary);
  border: 1px solid var(--border-color-primary); border-radius: 6px; overflow: hidden; }
.streamer-progress .sp-fill { height: 100%; background: var(--color-accent); }
.streamer-progress .sp-nums, .streamer-progress .sp-rate, .streamer-progress .sp-eta { font-size: 0.9em; }
/* a phone: label and numbers on one line, the bar under them, rate and ETA on the next */
@media (max-width: 640px) {
  .streamer-progress .sp-row { grid-template-columns: 1fr auto; gap: 2px 8px; margin: 8px 0; }
  .streamer-progress .sp-bar { grid-column: 1 / -1; grid-row: 2; }
  .streamer-progress .sp-label { grid-row: 1; }
  .streamer-progress .sp-nums { grid-row: 1; text-align: right; }
  .streamer-progress .sp-rate { grid-row: 3; }
  .streamer-progress .sp-eta { grid-row: 3; text-align: right; }
}
"""

# The picker, in the order people use the schemes, each labelled with the GPUs that serve it;
# the rarely served ones (integer weights other than 4 and 8 bits, W*A4 …) come last.
SCHEME_GPUS = {
    "FP8_DYNAMIC": "H100, L4, B200 (A100: weight-only)",
    "FP8_BLOCK": "H100, H200, B200",
    "W4A16": "A10G, A100, L4, H100",
    "NVFP4A16": "B200, RTX 50xx (A100/H100: weight-only)",
    "MXFP4A16": "B200, MI350",
    "W8A16": "Ampere and newer",
    "INT8": "T4, A10G, A100, H100, CPU",
    "W8A8": "T4, A10G, A100, H100, CPU",
    "W4A16_ASYM": "Ampere and newer",
    "W4AFP8": "H100, H200",
    "MXFP8A16": "B200, MI350",
    "MXFP8": "B200, MI350",
    "MXFP4": "B200, MI350",
    "MXFP4XFP8": "B200, MI350",
    "MXFP6A16": "MI350",
    "MXFP6A8": "MI350",
}


def scheme_choices() -> list[tuple[str, str]]:
    """(label, value) pairs for the scheme picker; every accepted preset appears exactly once."""
    presets = accepted_presets()
    common = [s for s in SCHEME_GPUS if s in presets]
    rare = [s for s in presets if s not in SCHEME_GPUS]
    return [(f"{s} · {SCHEME_GPUS[s]}", s) for s in common] + [(f"{s} · experimental", s) for s in rare]


INTRO = """# streamer: quantize a Hub model, publish it
Reads the source with HTTP range requests (never downloads it whole), quantizes with a
[compressed-tensors](https://github.com/neuralmagic/compressed-tensors) scheme that
[vLLM](https://docs.vllm.ai) loads, and publishes the result to a new repo **in one commit**.
Data-free schemes only: no calibration data needed."""


def build_demo() -> gr.Blocks:
    """The whole app as gradio Blocks: the page, and the endpoints /whoami, /suggest, /plan,
    /convert and /cancel. On a Space (settings.ON_SPACES) it has the sign-in button, which makes
    gradio ask for OAuth."""
    choices = scheme_choices()
    values = [v for _, v in choices]
    default_scheme = settings.DEFAULT_SCHEME if settings.DEFAULT_SCHEME in values else values[0]
    default_ignore = format_ignore(suggest_ignore(None).ignore[:2])
    with gr.Blocks(title="streamer: quantize a Hub model") as demo:
        gr.Markdown(INTRO)
        with gr.Row():
            if settings.ON_SPACES:
                gr.LoginButton(scale=0, min_width=260)
            account_md = gr.Markdown("Checking who you are…", elem_id="account")
        with gr.Row():
            source = gr.Textbox(label="Source model (repo id)", placeholder="meta-llama/Llama-3.1-8B-Instruct",
                                elem_id="source", scale=3)  # fmt: skip
            revision = gr.Textbox(label="Revision (optional)", placeholder="main", elem_id="revision", scale=1)
        with gr.Row():
            with gr.Column(scale=1):
                scheme = gr.Dropdown(choices, value=default_scheme, label="Scheme (the GPUs that serve it)",
                                     elem_id="scheme")  # fmt: skip
                scheme_md = gr.Markdown(describe_scheme(default_scheme), elem_id="scheme-blurb")
                # fan-out: more schemes from the same read of the source, each to its own repo
                extra_schemes = gr.Dropdown(choices, value=[], multiselect=True, elem_id="extra-schemes",
                                            label="Also publish as (more schemes, one read of the source for all)")  # fmt: skip
            with gr.Column(scale=1):
                ignore = gr.Textbox(
                    label="Ignore (kept unquantized): module names or re:PATTERN, one per line",
                    value=default_ignore, lines=5, max_lines=12, elem_id="ignore",
                )  # fmt: skip
                notes_md = gr.Markdown("", elem_id="suggest-notes")
        with gr.Row():
            namespace = gr.Dropdown([], label="Target namespace", allow_custom_value=True, elem_id="namespace", scale=1)
            repo_name = gr.Textbox(label="Target repo name", placeholder="Llama-3.1-8B-Instruct-FP8_DYNAMIC",
                                   elem_id="repo-name", scale=2)  # fmt: skip
            with gr.Column(scale=1, min_width=180):
                private = gr.Checkbox(label="Private repo (always, for a private or gated source)", value=False,
                                      elem_id="private")  # fmt: skip
                create_pr = gr.Checkbox(label=CREATE_PR_LABEL, value=False, elem_id="create-pr")
                skip_incompatible = gr.Checkbox(label=SKIP_INCOMPATIBLE_LABEL,
                                                value=False, elem_id="skip-incompatible")  # fmt: skip
        # shown once "Also publish as" has a scheme: each one's repo, in the same namespace
        extra_names = gr.Textbox("", label="Repo names of the other schemes (one line each: SCHEME: name)", lines=2,
                                 max_lines=8, visible=False, elem_id="extra-names")  # fmt: skip
        with gr.Row():
            plan_btn = gr.Button("Plan (dry run)", variant="secondary", elem_id="plan-btn")
            convert_btn = gr.Button("Convert and publish", variant="primary", elem_id="convert-btn")
            # nothing to cancel until a conversion of this page runs
            cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel-btn", interactive=False)
        status = gr.HTML("", elem_id="status")
        with gr.Tabs(selected="progress") as tabs:
            with gr.Tab("Progress", id="progress", elem_id="progress-tab"):
                progress = gr.HTML(progress_html({}, 0, "Idle"), elem_id="progress")
                result_md = gr.HTML("", elem_id="result")
                log_box = gr.Textbox(label="Log", lines=8, max_lines=16, interactive=False, autoscroll=True,
                                     elem_id="log")  # fmt: skip
            with gr.Tab("Plan", id="plan", elem_id="plan-tab"):
                overview = gr.Markdown("Click **Plan** to see what will be quantized before anything heavy runs.",
                                       elem_id="plan-overview")  # fmt: skip
                shards_df = gr.Dataframe(headers=SHARD_COLUMNS, label="Output shards", interactive=False, elem_id="plan-shards")
                tensors_df = gr.Dataframe(headers=TENSOR_COLUMNS, label="Tensors", interactive=False, wrap=True,
                                          elem_id="plan-tensors")  # fmt: skip
                fused_df = gr.Dataframe(headers=FUSED_COLUMNS, label="Fused sets", interactive=False, elem_id="plan-fused")
                warnings_df = gr.Dataframe(headers=WARNING_COLUMNS, label="Warnings", interactive=False, wrap=True,
                                           elem_id="plan-warnings")  # fmt: skip

        form = [source, revision, scheme, ignore, namespace, repo_name, private, create_pr, skip_incompatible,
                extra_schemes, extra_names]  # fmt: skip
        plan_outputs = [status, overview, shards_df, tensors_df, fused_df, warnings_df]
        demo.load(on_load, None, [account_md, namespace], api_name="whoami_ui", api_visibility="private")

        # The API endpoints (gradio_client) raise their error, which a program needs; the page's
        # buttons show it once in the status line instead. The API's scheme is a plain text field,
        # so an unknown scheme gets the app's sentence, not gradio's "not in the list of choices";
        # so are the extra schemes (names separated by commas).
        api_scheme, api_extra = gr.Textbox(visible=False), gr.Textbox(visible=False)
        api_form = [source, revision, api_scheme, *form[3:9], api_extra, extra_names]
        hidden_json = gr.JSON(visible=False)
        gr.Button(visible=False).click(whoami_api, None, hidden_json, api_name="whoami")
        gr.Button(visible=False).click(suggest, [source, revision, api_scheme], [ignore, notes_md, repo_name],
                                       api_name="suggest", concurrency_limit=8, concurrency_id="suggest")  # fmt: skip
        gr.Button(visible=False).click(plan, api_form, plan_outputs, api_name="plan",
                                       concurrency_limit=4, concurrency_id="plan")  # fmt: skip
        gr.Button(visible=False).click(run_convert, api_form, [status, progress, log_box, result_md], api_name="convert",
                                       concurrency_limit=settings.MAX_CONVERSIONS, concurrency_id="convert")  # fmt: skip
        gr.Button(visible=False).click(cancel, None, status, api_name="cancel", concurrency_limit=None)

        # Suggestions: see suggest_ui / apply_suggestion (they never overwrite an edited field).
        memo = gr.State({"key": None, "ignore": default_ignore, "name": ""})
        pending = gr.State(None)
        extra_memo = gr.State({"put": {}, "typed": {}})  # see fill_extra_names
        fill_extra = dict(fn=fill_extra_names, inputs=[source, revision, scheme, repo_name, extra_schemes, extra_names, extra_memo],
                          outputs=[extra_names, extra_memo], queue=False, show_progress="hidden", api_visibility="private")  # fmt: skip
        for trigger in (source.submit, source.blur, revision.submit, revision.blur):
            trigger(suggest_ui, [source, revision, scheme, memo, status], [notes_md, pending, status], trigger_mode="always_last",
                    concurrency_limit=8, concurrency_id="suggest", show_progress="hidden",
                    api_visibility="private").then(
                apply_suggestion, [source, revision, scheme, ignore, repo_name, pending, memo], [ignore, repo_name, memo], queue=False,
                show_progress="hidden", api_visibility="private").then(**fill_extra)  # fmt: skip
        scheme.change(describe_scheme, scheme, scheme_md, queue=False, api_visibility="private").then(
            suggest_ui, [source, revision, scheme, memo, status], [notes_md, pending, status], trigger_mode="always_last",
            concurrency_limit=8, concurrency_id="suggest", show_progress="hidden", api_visibility="private").then(
            apply_suggestion, [source, revision, scheme, ignore, repo_name, pending, memo], [ignore, repo_name, memo], queue=False,
            show_progress="hidden", api_visibility="private").then(**fill_extra)  # fmt: skip
        # the other schemes' names follow the main name's pattern (lines the user typed stay)
        for trigger in (extra_schemes.change, repo_name.blur, repo_name.submit):
            trigger(**fill_extra)

        plan_btn.click(lambda: gr.Tabs(selected="plan"), None, tabs, queue=False, api_visibility="private")
        plan_btn.click(plan_ui, form, plan_outputs, api_visibility="private", concurrency_limit=4, concurrency_id="plan",
                       show_progress="hidden")  # fmt: skip
        # First (unqueued, at once) the panel says the run is queued and the last run's result
        # and messages go; then the run itself, queued. show_progress on the panel only: while
        # the run waits, gradio shows its place there ("queue: 2/3"), where the user looks.
        convert_btn.click(lambda: (gr.Tabs(selected="progress"), progress_html({}, 0, "Queued"), "", "", ""), None,
                          [tabs, progress, result_md, status, log_box], queue=False, api_visibility="private",
                          show_progress="hidden").then(
            run_convert_ui, form, [status, progress, log_box, result_md, cancel_btn],
            api_visibility="private", concurrency_limit=settings.MAX_CONVERSIONS, concurrency_id="convert",
            show_progress="full", show_progress_on=[progress])  # fmt: skip
        cancel_btn.click(cancel_ui, None, status, api_visibility="private", concurrency_limit=None, queue=True,
                         show_progress="hidden")  # fmt: skip
    return demo
