"""``python -m trainorch_jupyter.fakes PROVIDER --port N``: serve a provider fake until stopped.

The first line on stdout is the base URL (for scripts); the rest goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import FAKES, make_fake
from .base import OpenAPIValidator, RateWindow


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainorch_jupyter.fakes",
                                 description="Serve a local fake of a GPU provider's API.")
    ap.add_argument("provider", choices=sorted(FAKES))
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=0, help="port (default: any free port)")
    ap.add_argument("--api-key", action="append", dest="api_keys", metavar="KEY",
                    help="accept only this key (repeatable); default: accept any key")
    ap.add_argument("--rate-limit", action="append", dest="rate_limits", metavar="NAME=QUOTA/SECONDS",
                    help="a rate-limit window, e.g. minute=60/60 (repeatable; default: the spec's example policy)")
    ap.add_argument("--no-rate-limit", action="store_true", help="no rate limits at all")
    ap.add_argument("--provision-s", type=float, default=1.0, help="seconds in PROVISIONING (default 1)")
    ap.add_argument("--start-s", type=float, default=1.0, help="seconds in STARTING (default 1)")
    ap.add_argument("--on-exit", choices=("restart", "exited", "error"), default="restart",
                    help="what a pod does when its main process ends (default: restart, as RunPod does)")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="an environment variable every pod gets, as its image would set it (repeatable), "
                         "e.g. PATH=/path/to/venv/bin:/usr/bin:/bin")
    ap.add_argument("--work-dir", type=Path, help="where pods' directories go (default: a temporary dir)")
    ap.add_argument("--spec", type=Path, help="an OpenAPI spec to check all traffic against (needs openapi-core); "
                    "mismatches show in GET /_fake/state")
    args = ap.parse_args(argv)

    windows = [] if args.no_rate_limit else [RateWindow.parse(w) for w in args.rate_limits] if args.rate_limits else None
    validator = getattr(FAKES[args.provider], "spec_validator", OpenAPIValidator)(args.spec) if args.spec else None
    extra_env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            ap.error(f"--env {item!r}: expected KEY=VALUE")
        extra_env[key] = value
    fake = make_fake(args.provider, host=args.host, port=args.port, api_keys=args.api_keys, rate_limits=windows,
                      provision_s=args.provision_s, start_s=args.start_s, on_exit=args.on_exit,
                      work_dir=args.work_dir, validator=validator, extra_env=extra_env)
    fake.start()
    print(fake.base_url, flush=True)
    print(f"fake {args.provider} API at {fake.base_url}; bookkeeping at {fake.base_url}/_fake/state; "
          f"Ctrl-C to stop (kills every pod's processes)", file=sys.stderr, flush=True)
    fake.serve_until_stopped()
    return 0


if __name__ == "__main__":
    sys.exit(main())
