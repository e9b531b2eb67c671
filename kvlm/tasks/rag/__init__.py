"""The rag task: a `RetrievalAugmentedVLM` answering from product catalogues (see `task.py`)."""

from kvlm.tasks.info import Option, TaskInfo, positive_int


INFO = TaskInfo(
    name="rag",
    help="answers from a knowledge base (product catalogues) by retrieval",
    defaults=dict(train_size=12000, eval_size=1000, epochs=8, batch_size=64, learning_rate=1e-3),
    options=(
        Option("top_k", 3, "catalogue entries the reader reads per answer", type=positive_int),
        Option("train_catalogues", 500, "stores (catalogue seeds 0..N-1) the training examples come from",
               type=positive_int),
        Option("retriever_epochs", 3, "training epochs of the CLIP retriever (before the reader's --epochs)",
               type=positive_int),
        Option("index_store", 10_000, "the store whose catalogue goes into the saved model's index "
               "(10000-10049 are the held-out stores)", type=int),
        Option("index_dir", None, "the index folder attached by `kvlm index attach`", cli=False),
    ),
    refuses=("data_dir", "datasets"),
    refusal="trains on the product-catalogue task (kvlm.data.catalogue), not on other data",
)
