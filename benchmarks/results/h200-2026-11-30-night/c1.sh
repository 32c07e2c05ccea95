cp .carry/gguf.part00 /tmp/gguf.part00 && ls -la /tmp/gguf.part00
