"""Models, outside the driver: where a model comes from (a local directory, a hub-cache entry, a hub id
resolved offline) and the MiniMax-Text-01 / M1 checkpoint layouts (`cispo-convert`).

- `loading.py`: `resolve_model_dir`, `learner_dir` (what the learner loads), `engine_dir` (what vLLM gets).
- `convert.py`: the streaming converter and the `cispo-convert` command.
- `minimax_layout.py`: the remote-code and native layouts, key by key, with their sources.
- `minimax_rope.py`: partial RoPE (`rotary_dim` < head_dim) for transformers' MiniMaxForCausalLM.

Imports only `cispo.core` (and third-party libraries); the driver and the engines call it.
"""
