"""Train-start audits inside the training job: a Lightning callback, a Hugging Face TrainerCallback and a plain
call for custom loops (optional extras; the core never imports them)."""
