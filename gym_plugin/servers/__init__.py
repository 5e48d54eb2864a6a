"""The HTTP servers of a Gym deployment, and the framework they share.

- `base`: the `Server` base class (routes, error body, auth, in-process calls) and the `Directory` servers find
  each other through; `auth`: the bearer-token middleware; `registry`: implementation name -> class.
- `head`: the head server (the merged config); `agent`: the multi-turn tool-calling agent (``simple_agent``);
  `aggregate`: NeMo Gym's ``/aggregate_metrics`` summary, served by agents and resource servers.
- `resources/`: resource servers (sessions, tools, ``/verify``); `policy/`: the policy model server
  (Responses API -> an OpenAI-compatible endpoint with token ids); `embedded/`: the embedded HF policy, an
  OpenAI/vLLM-compatible endpoint in this process.
"""
