#!/usr/bin/env python3
"""PayMCP side of the tollgate benchmark: a FastMCP server over stdio.

One priced tool, `echo {text}` at 0.01 USD, gated by PayMCP with its bundled
mock provider (`paymcp.providers.MockPaymentProvider`, registered under the
provider name "mock"). With `default_status="paid"` (its default) every
payment it creates is born paid, so no human or network is involved: the
analogue of tollgate's `[provider] kind = "mock"`. One free tool,
`word_count {text}`, unpriced as in tollgate's demo pricing: the MCP round
trip alone.

The payment flow (PayMCP's `Mode`) comes from `--mode` or `PAYMCP_MODE`
(default `two_step`): auto, two_step, resubmit, elicitation, progress,
dynamic_tools. (`oob` raises "not implemented"; `x402` needs an x402
provider, and with any other provider PayMCP itself falls back to resubmit.)

State lives in PayMCP's default InMemoryStateStore: nothing is durable.
Logging is set to WARNING, as tollgate runs with TOLLGATE_LOG=tollgate=warn.
"""
import argparse
import os
import sys

from mcp.server.fastmcp import Context, FastMCP
from paymcp import Mode, PayMCP, price

MODES = [m.value for m in Mode if m not in (Mode.OOB, Mode.X402)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mode",
        default=os.environ.get("PAYMCP_MODE", "two_step"),
        choices=MODES,
        help="PayMCP payment flow (env PAYMCP_MODE; default two_step)",
    )
    args = parser.parse_args()

    mcp = FastMCP("bench", log_level="WARNING")
    PayMCP(
        mcp,
        providers={"mock": {"default_status": "paid"}},
        mode=Mode(args.mode),
    )

    @mcp.tool()
    @price(price=0.01, currency="USD")
    async def echo(text: str, ctx: Context):
        """Echo the text back."""
        return text

    # Unpriced, and shaped as `echo` is (no declared output, so no
    # structured output to validate): the floor under PayMCP's flows.
    @mcp.tool()
    async def word_count(text: str, ctx: Context):
        """Counts the words in a text."""
        return str(len(text.split()))

    print(f"paymcp_server: mode={args.mode}", file=sys.stderr)
    mcp.run(transport="stdio")


if __name__ == "__main__":
    main()
