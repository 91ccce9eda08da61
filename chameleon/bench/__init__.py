"""The harness behind ``chameleon bench``: recall@k vs latency, the document KV cache under a
request stream, pipelined kNN-LM, and the FPGA kernel's cycle model."""
