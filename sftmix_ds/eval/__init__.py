from .run import accuracy, evaluate_model, markdown_table
