"""The issue's routing scenarios as data, reusable by end-to-end tests through the real ext_proc path.

Each scenario lists pods (metric values a simulator or metrics endpoint should serve, in vLLM
terms) and a sequence of requests with the expected outcome: the index of the pod that must be
picked, SAME_AS_FIRST (the pod the first request went to), ANY (routed anywhere), or SHED (429).
test_scenarios.py runs them against build_scheduler + build_admission with the default config.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ANY, SAME_AS_FIRST, SHED = -1, -2, -3

SYSTEM_PROMPT = "You are a careful assistant that answers questions about SQL databases. " * 24  # ~1.7 KB


@dataclass(frozen=True)
class Pod:
    waiting: int = 0
    running: int = 0
    kv: float = 0.0  # vllm:kv_cache_usage_perc
    lora_max: int = 0  # vllm:lora_requests_info{max_lora}
    lora_running: tuple[str, ...] = ()  # running_lora_adapters
    lora_waiting: tuple[str, ...] = ()  # waiting_lora_adapters


@dataclass(frozen=True)
class Step:
    model: str
    prompt: str
    expect: int
    priority: int = 0  # via an InferenceObjective (or InferenceModel criticality)


@dataclass(frozen=True)
class Scenario:
    name: str
    pods: tuple[Pod, ...]
    steps: tuple[Step, ...]
    lora: bool = False
    notes: str = field(default="")


SCENARIOS = (
    Scenario(
        "lora adapter wins despite higher kv use",
        pods=(Pod(kv=0.3, lora_max=2, lora_running=("other",)),
              Pod(kv=0.5, lora_max=2, lora_running=("sql-lora",)),
              Pod(kv=0.1, lora_max=1, lora_running=("other",))),
        steps=(Step("sql-lora", "select the rows", expect=1),),
        lora=True,
    ),
    Scenario(
        "shortest queue wins",
        pods=(Pod(waiting=6, kv=0.2), Pod(waiting=1, kv=0.2), Pod(waiting=3, kv=0.2)),
        steps=(Step("base", "hello there", expect=1),),
    ),
    Scenario(
        "shared prefix returns to its pod",
        pods=(Pod(waiting=1, kv=0.3),) * 4,
        steps=(Step("base", SYSTEM_PROMPT + "Question one: how do joins work?", expect=ANY),
               Step("base", SYSTEM_PROMPT + "Question two: what is an index?", expect=SAME_AS_FIRST),
               Step("base", SYSTEM_PROMPT + "Question three: explain vacuum.", expect=SAME_AS_FIRST)),
        notes="the director must count the first requests in flight (or let them finish) between steps",
    ),
    Scenario(
        "saturated pool sheds sheddable with 429 but routes critical",
        pods=(Pod(waiting=10, kv=0.9), Pod(waiting=7, kv=0.85)),
        steps=(Step("base", "low priority batch job", expect=SHED, priority=-1),
               Step("base", "interactive request", expect=ANY, priority=100),
               Step("base", "standard request", expect=ANY, priority=0)),
    ),
)
