"""vLLM's `LoRARequest`: which adapter a request runs with."""

from dataclasses import dataclass, field


@dataclass(eq=False)
class LoRARequest:
    """A PEFT adapter for a request: `LoRARequest(lora_name, lora_int_id, lora_path)`.

    As in vLLM, `lora_int_id` identifies the adapter (it must be > 0 and unique per adapter),
    and two requests are the same adapter when their names are equal.
    """

    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: str | None = None
    tensorizer_config_dict: dict | None = field(default=None, repr=False)
    load_inplace: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"id must be > 0, got {self.lora_int_id}")
        if not self.lora_path:
            raise ValueError("lora_path cannot be empty")

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LoRARequest) and self.lora_name == other.lora_name

    def __hash__(self) -> int:
        return hash(self.lora_name)
