"""New token rows by hand, for pipelines without load_textual_inversion: the lines a model card shows."""


def add_token_rows(added="names"):
    """After `vectors = load_file(...)[token]` ([k, d]): add <tok>, <tok>_1, ... (as `added`, an expression over
    `names`) and write their rows."""
    return f"""names = [token] + [f"{{token}}_{{i}}" for i in range(1, len(vectors))]
pipe.tokenizer.add_tokens({added})
if pipe.text_encoder.get_input_embeddings().weight.shape[0] < len(pipe.tokenizer):
    pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer), mean_resizing=False)
table = pipe.text_encoder.get_input_embeddings().weight
with torch.no_grad():
    table[pipe.tokenizer.convert_tokens_to_ids(names)] = vectors.to(table.device, table.dtype)"""
