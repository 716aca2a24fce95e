"""The web app (the Hugging Face Space): a gradio page and API over the engine, for signed-in users.

One module per job, in the order a request meets them: `settings` (the environment), `wording`
(errors as sentences in the form's words), `auth` (whose token, which account), `slots` (one
conversion per user), `forms` (reading the form's fields), `suggestions` (prefilling the form),
`tables` (the plan as tables), `progress` (the live panel), `results` (what a finished run
shows), `plan` (the dry run), `convert` (the run: a worker thread and the generator that streams
it), `layout` (the page). `app.py` at the repository root builds the page and launches it.
"""
