"""Answer OpenAI Batch input files offline, as the Batch API or ``vllm run-batch`` would, for tests.

Each input line (``custom_id``, ``method``, ``url``, ``body``) gets one output line
(``id``, ``custom_id``, ``response: {status_code, request_id, body}``, ``error``) whose body is the
fake server's chat completion for that request body (persona_tune/testing/fake_openai_server.py), so
a Batch round trip answers exactly what the online path against the fake server answers. ``fail``
names custom_ids answered with an error line instead (the Batch API's per-request failure).

    python -m persona_tune.testing.batch_runner -i requests-r0001-001.jsonl -o out.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from persona_tune.testing.fake_openai_server import chat_completion


def answer_line(request: dict, failed: bool = False) -> dict:
    custom_id = request["custom_id"]
    if failed:
        return {"id": f"batch_req_{custom_id[:12]}", "custom_id": custom_id, "response": None,
                "error": {"code": "server_error", "message": "the request failed (injected)"}}
    if request.get("method") != "POST" or request.get("url") != "/v1/chat/completions":
        return {"id": f"batch_req_{custom_id[:12]}", "custom_id": custom_id,
                "response": {"status_code": 404, "request_id": custom_id[:12],
                             "body": {"error": {"message": f"no route {request.get('url')}"}}}, "error": None}
    return {"id": f"batch_req_{custom_id[:12]}", "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": custom_id[:12], "body": chat_completion(request["body"])},
            "error": None}


def answer_file(input_path: str | Path, output_path: str | Path, fail: set[str] = frozenset()) -> int:
    """Write the output file of one Batch input file; returns the number of lines answered."""
    lines = 0
    with Path(input_path).open(encoding="utf-8") as src, Path(output_path).open("w", encoding="utf-8") as out:
        for text in src:
            if text.strip():
                request = json.loads(text)
                out.write(json.dumps(answer_line(request, request["custom_id"] in fail), ensure_ascii=False) + "\n")
                lines += 1
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-i", "--input", required=True)
    parser.add_argument("-o", "--output", required=True)
    args = parser.parse_args(argv)
    print(f"{answer_file(args.input, args.output)} requests answered into {args.output}")


if __name__ == "__main__":
    main()
