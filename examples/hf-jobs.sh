#!/usr/bin/env bash
# Hugging Face Jobs trigger for streamer's mirroring jobs (needs `pip install -U huggingface_hub`
# and `hf auth login`; Jobs are available to PRO users and Team/Enterprise organizations).
#
# The jobs file lives in a (private) dataset repo, here acme/streamer-mirror, mounted read-only at
# /config; the token reaches the Job as a secret, never on the command line.
#   hf upload acme/streamer-mirror examples/jobs.toml jobs.toml --repo-type dataset --private
set -euo pipefail

CONFIG_REPO=${CONFIG_REPO:-acme/streamer-mirror}
# Replace the git URL with wherever you install streamer from.
INSTALL='pip install -q torch --index-url https://download.pytorch.org/whl/cpu && pip install -q "streamer-quant[xet] @ git+https://github.com/OWNER/streamer"'
RUN='python -m streamer mirror /config/jobs.toml --device cpu'

case "${1:-schedule}" in
  once)      # run every job now, once
    hf jobs run --flavor cpu-upgrade --timeout 6h --secrets HF_TOKEN \
      --env HF_XET_HIGH_PERFORMANCE=1 \
      -v "hf://datasets/${CONFIG_REPO}:/config" \
      python:3.12 bash -c "$INSTALL && $RUN"
    ;;
  schedule)  # every hour; up-to-date jobs are skipped in seconds
    hf jobs scheduled run @hourly --no-concurrency \
      --flavor cpu-upgrade --timeout 6h --secrets HF_TOKEN \
      --env HF_XET_HIGH_PERFORMANCE=1 \
      -v "hf://datasets/${CONFIG_REPO}:/config" \
      python:3.12 bash -c "$INSTALL && $RUN"
    ;;
  webhook)   # no server of your own: a Hub webhook on the sources starts a Job with the payload
    # 1. create the Job that the webhook will re-run (it gets $WEBHOOK_PAYLOAD);
    #    `--webhook-payload` runs only the jobs whose source the payload names.
    hf jobs run --detach --flavor cpu-upgrade --timeout 6h --secrets HF_TOKEN \
      -v "hf://datasets/${CONFIG_REPO}:/config" \
      python:3.12 bash -c "$INSTALL && $RUN --webhook-payload"
    # 2. then point a webhook at it (python):
    #    from huggingface_hub import HfApi
    #    HfApi().create_webhook(job_id="<id printed above>", domains=["repo"],
    #        watched=[{"type": "model", "name": "meta-llama/Llama-3.1-8B-Instruct"}],
    #        secrets={"HF_TOKEN": "hf_…"})
    ;;
  *) echo "usage: $0 [once|schedule|webhook]" >&2; exit 2 ;;
esac
