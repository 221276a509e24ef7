"""mvllm-sim: a vLLM stand-in that behaves like a GPU server, in time and in failure."""
