"""R1's later stages as library functions: rejection sampling (stage 3) and distillation.

* `rejection_sample`: k samples per prompt → keep correct ones → drop mixed-language, long-paragraph,
  code-block, badly formatted and duplicate traces → at most m per prompt, each with provenance.
* `distill`: teacher traces (sampled or given) → the same filters → SFT of a student of another
  architecture and tokenizer.
The trainers they feed live in r1lab.train (sft, reward_model).
"""

from .distill import DistillConfig, DistillResult, distill, retemplate, retokenization_stats
from .rejection import (
    REJECTION_REASONS,
    Candidate,
    FilterConfig,
    RejectionConfig,
    RejectionResult,
    failed_filters,
    filter_records,
    has_bad_format,
    has_code_block,
    has_long_paragraph,
    has_mixed_language,
    normalize_for_dedup,
    paragraphs,
    rejection_sample,
    run_rejection,
    select,
    write_jsonl,
)

__all__ = [
    "REJECTION_REASONS", "Candidate", "DistillConfig", "DistillResult", "FilterConfig", "RejectionConfig",
    "RejectionResult", "distill", "failed_filters", "filter_records", "has_bad_format",
    "has_code_block", "has_long_paragraph", "has_mixed_language", "normalize_for_dedup", "paragraphs",
    "rejection_sample", "retemplate", "retokenization_stats", "run_rejection", "select", "write_jsonl",
]
