"""What rrepa trains itself for Fashion-MNIST, so that the default job needs no download of weights: the
dataset reader, the embedded self-supervised encoder (an alignment target) and the evaluator CNN (the
feature network of the embedded FID)."""
