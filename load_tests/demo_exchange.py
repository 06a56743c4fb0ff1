"""One exchange with the demo model through a running server, printed as README.md's first-screen transcript.

    python load_tests/demo_exchange.py "How's the weather looking in Lisbon today?"

The question goes out with the demo's two client tools declared (greedy); each call the model makes is
answered by k2ray/demo/tools.py and sent back, and the model's answer follows: user, reasoning, tool call,
tool result, reasoning, answer, one line each, exactly as the server returned them.
"""

from __future__ import annotations

import argparse
import json
import sys

import openai
from demo_eval import check_loopback  # sibling module (run as a script)
from demo_eval_turns import assistant_turn, reasoning_of

from k2ray.demo.tools import CONVERT_UNITS_TOOL, GET_WEATHER_TOOL, convert_units, get_weather

TOOLS = [GET_WEATHER_TOOL, CONVERT_UNITS_TOOL]
RUNNERS = {"get_weather": get_weather, "convert_units": convert_units}
LABEL_WIDTH = 12


def line(label: str, text: str) -> str:
    return f"{label:<{LABEL_WIDTH}}{text}"


def exchange(client: openai.OpenAI, model: str, question: str, max_tokens: int) -> list[str]:
    messages: list[dict] = [{"role": "user", "content": question}]
    out = [line("user", question)]
    first = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, max_tokens=max_tokens,
                                           temperature=0).choices[0].message
    out.append(line("reasoning", reasoning_of(first)))
    messages.append(assistant_turn(first))
    for call in first.tool_calls or []:
        out.append(line("tool call", f"{call.function.name}({call.function.arguments})"))
        result = json.dumps(RUNNERS[call.function.name](**json.loads(call.function.arguments)))
        out.append(line("tool result", result))
        messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    if first.tool_calls:
        answer = client.chat.completions.create(model=model, messages=messages, tools=TOOLS,
                                                max_tokens=max_tokens, temperature=0).choices[0].message
        out.append(line("reasoning", reasoning_of(answer)))
        first = answer
    out.append(line("answer", first.content or ""))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("question")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default=None, help="served model id (default: the first of /v1/models)")
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--timeout-s", type=float, default=120.0)
    args = parser.parse_args(argv)
    client = openai.OpenAI(base_url=check_loopback(args.base_url), api_key="unused", timeout=args.timeout_s,
                           max_retries=0)
    model = args.model or client.models.list().data[0].id
    print("\n".join(exchange(client, model, args.question, args.max_tokens)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
