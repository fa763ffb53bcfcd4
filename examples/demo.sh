#!/usr/bin/env bash
# Run the pool on the example handler with 20 sample messages published.
# Starts a local RabbitMQ if none listens and creates .venv if missing.
# Ctrl-C drains and stops. RMQPOOL_QUEUE picks the queue (default: demo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/ensure-broker
if [ ! -x .venv/bin/rmqpool ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q -e .
fi
export RMQPOOL_QUEUE="${RMQPOOL_QUEUE:-demo}"
.venv/bin/python examples/publish.py --count 20 --fail-every 7
exec .venv/bin/rmqpool --workers 2 --max-retries 2 --retry-delays 1,2 examples.handlers:handle
