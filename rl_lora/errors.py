"""The project's error types: a leaf module (imports nothing), so the CLI catches them by class without loading
anything heavy. The CLI prints a ConfigError or a RunError (FleetError included) as one line, wherever it is
raised, before or after the model loads.
"""


class ConfigError(ValueError):
    """A one-line, user-facing problem with the configuration (names the offending key). CLI: exit 2."""


class RunError(RuntimeError):
    """The run stopped on purpose (a fault it must not train through); the message says why and what to do.
    CLI: exit 1."""


class FleetError(RunError):
    """The sampler fleet could not serve a request even after rebuilding engines; the message says why."""


class EngineError(RuntimeError):
    """A vLLM engine failed under a call (its engine-core process died, or the in-process core raised): the
    fleet rebuilds the engine and submits the call again. Raised by the Sampler (rl_lora/sampling/sampler.py engine_call);
    never reaches the user (after MAX_RESTARTS the fleet raises FleetError)."""
