from .run import accuracy, eval_sets, evaluate_model, markdown_table
