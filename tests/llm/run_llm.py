"""Run vLLM's ``LLM(...)`` API in a fresh process (as a script: vLLM spawns processes and needs a
``__main__`` guard) and print the greedy token ids of bench.llms.PROMPTS as one JSON line.

Usage: python run_llm.py MODEL_DIR JSON_OPTIONS   (options: load_format, extra, tp, lora)
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    from vllm import LLM, SamplingParams

    model, opts = sys.argv[1], json.loads(sys.argv[2])
    prompts = opts.get("prompts") or ["w1 w2 w3 w4", "w10 w20 w30", "w200 w5 w7 w9 w11"]
    llm = LLM(
        model=model, dtype="float32", max_model_len=128, enforce_eager=True, gpu_memory_utilization=0.1,
        seed=0, tensor_parallel_size=opts.get("tp", 1), load_format=opts.get("load_format", "auto"),
        model_loader_extra_config=opts.get("extra") or {},
    )  # fmt: skip
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=opts.get("max_tokens", 8)))
    print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outs]), flush=True)


if __name__ == "__main__":
    main()
