cp .carry/gguf.part01 /tmp/gguf.part01 && ls -la /tmp/gguf.part0*
