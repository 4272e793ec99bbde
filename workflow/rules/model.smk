# Training, evaluation, prediction (filled in with the model stages).


def all_targets():
    return data_targets() + [f"results/genes/{s}.txt" for s in SPLITS]
