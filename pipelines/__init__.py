"""User-facing pipelines and the ``control`` context manager."""

from .consistency import ConsistentSubjectsPipeline, ConsistentSubjectsXLPipeline, Subject
from .control import EditSession, control
from .flow_edit import flow_edit
from .inversion import default_guidance, invert, reconstruct
from .mmdit import Prompt2PromptFluxPipeline, Prompt2PromptSD3Pipeline
from .output import FlowEditOutput
from .p2p import Prompt2PromptOutput, Prompt2PromptPipeline, Prompt2PromptXLPipeline, load_pipeline

__all__ = [
    "Prompt2PromptPipeline",
    "Prompt2PromptXLPipeline",
    "Prompt2PromptSD3Pipeline",
    "Prompt2PromptFluxPipeline",
    "Prompt2PromptOutput",
    "ConsistentSubjectsPipeline",
    "ConsistentSubjectsXLPipeline",
    "Subject",
    "control",
    "EditSession",
    "load_pipeline",
    "invert",
    "reconstruct",
    "default_guidance",
    "flow_edit",
    "FlowEditOutput",
]
