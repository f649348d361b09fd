"""Generation: tokenizer and chat template, sampler, the generate loop (a generator of events), the Engine."""
