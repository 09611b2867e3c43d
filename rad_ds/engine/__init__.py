"""What a run on DeepSpeed engines needs, below the stages that run them (distill/, teacher_cache/): DeepSpeed
configs and the frozen teacher's engine (``engines``), the final hidden states and LM head of a model, also
partitioned (``heads``), a teacher's top-k targets taken chunk by chunk (``topk``), what identifies a model's
weights without loading them (``identity``), and the fault points tests kill runs at (``faults``)."""
