"""The engine's stages, one file each: gateway, tokenizer, scheduler, executor, detokenizer."""
