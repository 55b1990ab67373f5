# nbdev 2's setup.py, without its `pkg_resources` import (gone from recent setuptools).
from configparser import ConfigParser
import setuptools

config = ConfigParser(delimiters=["="])
config.read("settings.ini", encoding="utf-8")
cfg = config["DEFAULT"]

licenses = {"apache2": ("Apache Software License 2.0", "OSI Approved :: Apache Software License")}
statuses = ["1 - Planning", "2 - Pre-Alpha", "3 - Alpha", "4 - Beta", "5 - Production/Stable"]
py_versions = "3.10 3.11 3.12 3.13".split()
min_python = cfg["min_python"]
lic = licenses[cfg["license"]]

setuptools.setup(
    name=cfg["lib_name"],
    license=lic[0],
    classifiers=[
        "Development Status :: " + statuses[int(cfg["status"])],
        "Intended Audience :: " + cfg["audience"].title(),
        "License :: " + lic[1],
        "Natural Language :: " + cfg["language"].title(),
    ] + ["Programming Language :: Python :: " + o for o in py_versions[py_versions.index(min_python):]],
    url=cfg["git_url"],
    packages=setuptools.find_packages(include=["movierec", "movierec.*"]),
    include_package_data=True,
    install_requires=cfg.get("requirements", "").split(),
    extras_require={
        "postgres": ["psycopg[binary]>=3.2"],  # `movierec tune --storage postgresql+psycopg://...`
        # `--report-to mlflow|tensorboard`: MLflow's client without its UI server (`pip install mlflow` adds `mlflow ui`)
        "tracking": ["mlflow-skinny>=3.0", "tensorboard>=2.15"],
        "cuda": ["bitsandbytes>=0.45"],  # `--load-in-4bit` (QLoRA) on CUDA GPUs
    },
    python_requires=">=" + cfg["min_python"],
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    zip_safe=False,
    entry_points={
        "console_scripts": cfg.get("console_scripts", "").split(),
        "nbdev": [f'{cfg.get("lib_path")}={cfg.get("lib_path")}._modidx:d'],
    },
    version=cfg["version"],
    author=cfg["author"],
    author_email=cfg["author_email"],
    description=cfg["description"],
    keywords=cfg["keywords"],
)
