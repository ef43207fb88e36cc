"""``python -m nbimagine.emulator --port N [--latency S] [--background-duration S] [--rate-limit RPM]
[--batch-time S] [--close]``: serve until Ctrl-C (``--faults``: list the faults and exit)."""

from __future__ import annotations

import argparse
import signal
import sys

from ._server import Emulator


def _positive(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, not {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nbimagine.emulator", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8765, help="port (0 picks a free one; default 8765)")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds to wait before each answer")
    parser.add_argument("--stream-delay", type=float, default=0.0,
                        help="seconds between streamed events (makes partial images visible one by one)")
    parser.add_argument("--background-duration", type=float, default=1.0,
                        help="seconds a background response takes from queued to completed (default 1)")
    parser.add_argument("--close", action="store_true",
                        help="answer 'Connection: close' (helps async clients used across event loops)")
    parser.add_argument("--rate-limit", type=_positive, metavar="RPM",
                        help="requests per minute the generation routes accept (evenly spaced, no burst); "
                             "others get the provider's 429 with retry-after (default: no limit)")
    parser.add_argument("--batch-time", type=_seconds, default=2.0, metavar="S",
                        help="seconds a batch job takes from creation to completed (default 2)")
    parser.add_argument("--batch-expiry", type=_positive, metavar="S",
                        help="seconds after which an unfinished batch job expires (default: never)")
    parser.add_argument("--faults", action="store_true", help="list the faults the emulator can inject, and exit")
    args = parser.parse_args(argv)
    if args.faults:
        from ._faults import fault_kinds

        for kind in fault_kinds():
            print(f"{kind.usage():32} [{', '.join(kind.routes)}] {kind.description}")
        return 0

    def ready(emu: Emulator) -> None:
        # Printed (and flushed) once the socket listens, so scripts can wait for the first line.
        print(f"nbimagine emulator listening on {emu.url}")
        print(f"  OpenAI:  {emu.openai_base_url}")
        print(f"  Azure:   {emu.azure_endpoint}   (AzureOpenAI(base_url=... + '/openai/v1/'))")
        print(f"  Foundry: {emu.foundry_endpoint}   (AIProjectClient(endpoint=...); any bearer token)")
        print(f"  Gemini:  {emu.gemini_base_url}  (HttpOptions(base_url=..., api_version='v1beta'))")
        print(f"  Vertex:  {emu.vertex_base_url}")
        print("Point the SDKs at it:")
        print("  export NO_PROXY=127.0.0.1,localhost   # only needed behind an HTTP proxy")
        print(f"  export OPENAI_BASE_URL={emu.openai_base_url}")
        print("  export OPENAI_API_KEY=emulator")
        print(f"  export AZURE_OPENAI_ENDPOINT={emu.azure_endpoint}")
        print("  export AZURE_OPENAI_API_KEY=emulator")
        print(f"  export AZURE_AI_PROJECT_ENDPOINT={emu.foundry_endpoint}   # with credential=EmulatorCredential()")
        print(f"  export GOOGLE_GEMINI_BASE_URL={emu.gemini_base_url}")
        print(f"  export GOOGLE_VERTEX_BASE_URL={emu.vertex_base_url}")
        print("  export GEMINI_API_KEY=emulator")
        print(f"  export NBIMAGINE_EMULATOR={emu.url}")
        print("Ctrl-C to stop.", flush=True)

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM (e.g. from a CI runner) stops as cleanly as Ctrl-C

    signal.signal(signal.SIGTERM, terminate)
    emu = Emulator(args.host, args.port, latency=args.latency, close_connections=args.close,
                   stream_delay=args.stream_delay, background_duration=args.background_duration,
                   rate_limit=args.rate_limit, batch_time=args.batch_time, batch_expiry=args.batch_expiry)
    try:
        emu.serve_forever(on_ready=ready)
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
