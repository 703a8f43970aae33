"""Packaging for the speechllm toolkit. Pinned runtime versions live in tools/requirements.txt."""

from setuptools import find_packages, setup

setup(
    name="speechllm",
    version="0.1.0",
    description="Spoken slot filling with speech LLMs: regular, reasoning and hybrid recipes",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["speechllm", "speechllm.*"]),
    package_data={"speechllm.model": ["templates/*.jinja"]},
    install_requires=[
        "torch>=2.4", "transformers>=4.56", "peft>=0.17", "openai-whisper>=20240930", "kaldiio>=2.18",
        "soundfile", "scipy", "pyyaml", "tqdm", "tensorboard", "matplotlib", "jiwer>=3.0", "rapidfuzz",
        "tokenizers", "numpy", "text2num>=3.0", "Faker>=30",
    ],
    extras_require={"qlora": ["bitsandbytes>=0.45"], "test": ["pytest", "hypothesis"]},
    entry_points={
        "console_scripts": [
            "speechllm-train=speechllm.bin.train:main",
            "speechllm-decode=speechllm.bin.decode:main",
            "speechllm-score=speechllm.bin.score:main",
            "speechllm-transcribe=speechllm.bin.transcribe:main",
            "speechllm-infer=speechllm.bin.infer:main",
            "speechllm-install-models=speechllm.pretrained:main",
            "speechllm-bench=speechllm.bin.bench:main",
            "speechllm-memory=speechllm.bin.memory:main",
        ]
    },
)
