"""Long-context evaluation: full, StreamingLLM, InfLLM and Q-LLM side by side (`quickllama-bench`)."""
