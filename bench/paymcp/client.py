#!/usr/bin/env python3
"""One MCP client (the `mcp` package's stdio client) for both sides of the
tollgate / PayMCP benchmark.

It starts the server given after `--`, runs `--warmup` untimed flows and then
`--flows` timed ones, one after another, and prints flows/s. A "call" here is
ONE COMPLETED PAID FLOW, however many MCP requests it takes:

  two_step  echo -> payment id + next tool -> <next tool> {payment_id} -> text
            (2 tools/call)
  resubmit  echo -> isError, payment id -> echo {text, payment_id} -> text
            (2 tools/call)
  fast      echo -> text (1 tools/call; PayMCP's elicitation flow adds one
            server->client elicitation round trip, answered "accept" at once)
  free      word_count -> "1" (1 tools/call to a tool neither server prices:
            no payment at all, the server's MCP round trip alone)

Each flow sends its own text ("hi-<n>") and counts only if that same text
comes back, not as an error, with evidence that it was paid for:
  * tollgate: `_meta["tollgate/payment"]["status"] == "paid"` on the result;
  * PayMCP two_step / resubmit: the confirm step / resubmission is the
    payment check (PayMCP runs the tool only once its provider says "paid");
  * PayMCP fast (elicitation): the server asked for payment by elicitation
    during this very call, and the client accepted.
Anything else is a failure; any failure makes the exit status 1.

Response shapes understood:
  tollgate  payment answers in `structuredContent`
            ({"status"|"error": "payment_required", "payment_id", "next_step"}),
            paid results carry `_meta["tollgate/payment"]`.
  PayMCP    two_step: a normal result whose text is JSON
            {"message", "payment_url", "payment_id", "next_step"}
            (dynamic_tools: "next_tool" instead of "next_step");
            resubmit: isError, text "Error executing tool echo: Payment
            required ... Payment ID: mock_paid_<hex>".

The last line printed is machine-readable:
  RESULT <label> <workload> <flows> <seconds> <flows_per_s> <server_cpu_us_per_flow|na>
"""
import argparse
import asyncio
import json
import os
import re
import sys
import time

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.types import ElicitResult

PAYMENT_ID_IN_TEXT = re.compile(r"Payment ID:\s*(\S+)")


class FlowError(Exception):
    pass


def text_of(result) -> str:
    return "".join(getattr(c, "text", "") for c in (result.content or []))


def payment_fields(result) -> dict:
    """The payment-required answer as a dict, whichever server sent it."""
    sc = result.structuredContent
    if isinstance(sc, dict):
        if "payment_id" in sc:
            return sc
        inner = sc.get("result")
        if isinstance(inner, dict) and "payment_id" in inner:
            return inner
    text = text_of(result)
    try:
        parsed = json.loads(text)
        if isinstance(parsed, dict) and "payment_id" in parsed:
            return parsed
    except ValueError:
        pass
    m = PAYMENT_ID_IN_TEXT.search(text)
    if m:
        return {"payment_id": m.group(1)}
    raise FlowError(f"no payment id in answer: {short(result)}")


def tollgate_status(result):
    meta = result.meta or {}
    pay = meta.get("tollgate/payment") if isinstance(meta, dict) else None
    return pay.get("status") if isinstance(pay, dict) else None


def short(result) -> str:
    s = json.dumps(result.model_dump(mode="json", exclude_none=True, by_alias=True))
    return s if len(s) < 400 else s[:400] + "..."


def check_paid_text(result, want: str, other_evidence: bool) -> None:
    if result.isError:
        raise FlowError(f"error result: {short(result)}")
    got = text_of(result)
    if got != want:
        raise FlowError(f"expected text {want!r}, got: {short(result)}")
    status = tollgate_status(result)
    if status is not None:
        if status != "paid":
            raise FlowError(f"tollgate payment status {status!r}: {short(result)}")
    elif not other_evidence:
        raise FlowError(f"no evidence the call was paid for: {short(result)}")


class Runner:
    def __init__(self, session: ClientSession, workload: str):
        self.s = session
        self.workload = workload
        self.elicitations = 0
        self.progress_paid = 0

    async def elicit(self, ctx, params):
        # A client that needs no human: accept the payment request at once.
        self.elicitations += 1
        return ElicitResult(action="accept", content={})

    async def on_progress(self, progress, total, message):
        if message and "Payment received" in message:
            self.progress_paid += 1

    async def flow(self, n: int) -> None:
        want = f"hi-{n}"
        if self.workload == "two_step":
            r1 = await self.s.call_tool("echo", {"text": want})
            if r1.isError:
                raise FlowError(f"first call errored: {short(r1)}")
            f = payment_fields(r1)
            if f.get("status", "payment_required") != "payment_required":
                raise FlowError(f"not a payment request: {short(r1)}")
            nxt = f.get("next_step") or f.get("next_tool")
            if not nxt:
                raise FlowError(f"no next_step in answer: {short(r1)}")
            r2 = await self.s.call_tool(nxt, {"payment_id": f["payment_id"]})
            check_paid_text(r2, want, other_evidence=True)
        elif self.workload == "resubmit":
            r1 = await self.s.call_tool("echo", {"text": want})
            if not r1.isError:
                raise FlowError(f"first call was not a payment error: {short(r1)}")
            f = payment_fields(r1)
            if f.get("error", "payment_required") != "payment_required":
                raise FlowError(f"not a payment request: {short(r1)}")
            r2 = await self.s.call_tool("echo", {"text": want, "payment_id": f["payment_id"]})
            check_paid_text(r2, want, other_evidence=True)
        elif self.workload == "fast":
            e0, p0 = self.elicitations, self.progress_paid
            r = await self.s.call_tool("echo", {"text": want}, progress_callback=self.on_progress)
            asked = self.elicitations > e0 or self.progress_paid > p0
            check_paid_text(r, want, other_evidence=asked)
        elif self.workload == "free":
            r = await self.s.call_tool("word_count", {"text": want})
            if r.isError or text_of(r) != "1":
                raise FlowError(f"expected 1 word: {short(r)}")
            if tollgate_status(r) is not None:
                raise FlowError(f"a free call carried a payment: {short(r)}")
        else:
            raise SystemExit(f"unknown workload {self.workload}")


def server_cpu_seconds():
    """utime+stime of our child processes (the server), best effort (Linux)."""
    total, found = 0.0, False
    tick = os.sysconf("SC_CLK_TCK")
    try:
        kids = []
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/children") as fh:
                kids += fh.read().split()
        for pid in kids:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            found = True
    except OSError:
        return None
    return total if found else None


async def run(args) -> int:
    params = StdioServerParameters(
        command=args.server[0], args=args.server[1:], env=dict(os.environ)
    )
    errlog = open(args.server_log, "a") if args.server_log else sys.stderr
    failures: list[str] = []
    async with stdio_client(params, errlog=errlog) as (read, write):
        runner = None

        async def elicit(ctx, p):
            return await runner.elicit(ctx, p)

        async with ClientSession(read, write, elicitation_callback=elicit) as session:
            runner = Runner(session, args.workload)
            await session.initialize()
            for i in range(args.warmup):
                try:
                    await runner.flow(-1 - i)
                except FlowError as e:
                    failures.append(f"warm-up flow {i}: {e}")
                    break
            if failures:
                print(f"FAILED {failures[0]}", file=sys.stderr)
                print(f"RESULT {args.label} {args.workload} 0 0 0.0 na")
                return 1
            cpu0 = server_cpu_seconds()
            client0 = time.process_time()
            t0 = time.perf_counter()
            done = 0
            for i in range(args.flows):
                try:
                    await runner.flow(i)
                    done += 1
                except FlowError as e:
                    failures.append(f"flow {i}: {e}")
                    if len(failures) >= args.max_failures:
                        break
            elapsed = time.perf_counter() - t0
            client_cpu = time.process_time() - client0
            cpu1 = server_cpu_seconds()

    rate = done / elapsed if elapsed > 0 else 0.0
    server_us = (
        f"{(cpu1 - cpu0) / max(done, 1) * 1e6:.0f}" if cpu0 is not None and cpu1 is not None else "na"
    )
    mcp_calls = {"two_step": 2, "resubmit": 2, "fast": 1, "free": 1}[args.workload]
    print(
        f"{args.label} {args.workload}: {done}/{args.flows} flows completed in {elapsed:.3f}s "
        f"= {rate:.1f} flows/s (a 'call' = one completed paid flow = {mcp_calls} tools/call"
        + (f" + 1 elicitation" if runner.elicitations else "")
        + f"); client CPU {client_cpu / elapsed * 100:.0f}% of wall, server CPU {server_us} us/flow",
        file=sys.stderr,
    )
    for f in failures[:5]:
        print(f"FAILED {f}", file=sys.stderr)
    print(f"RESULT {args.label} {args.workload} {done} {elapsed:.4f} {rate:.1f} {server_us}")
    return 1 if failures or done != args.flows else 0


def main() -> None:
    ap = argparse.ArgumentParser(
        description="Drive a paid MCP stdio server through N sequential paid flows.",
        usage="%(prog)s --workload {two_step,resubmit,fast,free} [--flows N] [--label L] -- SERVER_CMD [ARGS...]",
    )
    ap.add_argument("--workload", required=True, choices=["two_step", "resubmit", "fast", "free"])
    ap.add_argument("--flows", type=int, default=int(os.environ.get("BENCH_FLOWS", "2000")))
    ap.add_argument("--warmup", type=int, default=20, help="untimed flows first (default 20)")
    ap.add_argument("--label", default="server")
    ap.add_argument("--max-failures", type=int, default=10, help="stop after this many failures")
    ap.add_argument("--server-log", help="append the server's stderr here instead of ours")
    ap.add_argument("server", nargs=argparse.REMAINDER, help="-- then the server command")
    args = ap.parse_args()
    if args.server and args.server[0] == "--":
        args.server = args.server[1:]
    if not args.server:
        ap.error("give the server command after --")
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
