# Two commands do all the set-up on a fresh machine:
#   make book   build the HTML book into _build/html
#   make test   run every test (unit, notebooks, strict book build, browser)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
EXTRAS := book,test,triton
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: book test unit oldest-triton nbval portability build-strict browser chromium pdf texlive notebooks bench clean

# (Re)install only when the dependency declarations change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

book: $(STAMP)
	$(BIN)/jupyter-book build --quiet .
	@echo "The book: $(CURDIR)/_build/html/index.html"

test: unit oldest-triton nbval portability build-strict browser

unit: $(STAMP)
	$(BIN)/python -m pytest tests --ignore=tests/browser --ignore=tests/pdf -q
	$(BIN)/python -m pytest --doctest-modules celib -q  # the examples of the API reference

# The kernel tests again with the oldest Triton celib declares (pyproject.toml, celib/_versions.py), installed
# into its own folder and put in front of the pinned one. Its interpreter needs NumPy < 2.4 (_versions.py).
OLDEST_TRITON := 3.6.0
OLDEST_TRITON_NUMPY := 2.3.5
OLDEST := $(VENV)/oldest-triton
$(OLDEST)/.installed: $(STAMP) Makefile
	rm -rf $(OLDEST)
	$(BIN)/python -m pip install --quiet --no-deps --target $(OLDEST) triton==$(OLDEST_TRITON) numpy==$(OLDEST_TRITON_NUMPY)
	touch $@

oldest-triton: $(OLDEST)/.installed
	PYTHONPATH=$(OLDEST) $(BIN)/python -c "import triton, numpy; assert triton.__version__ == '$(OLDEST_TRITON)', triton.__file__; print('triton', triton.__version__, 'numpy', numpy.__version__)"
	PYTHONPATH=$(OLDEST) $(BIN)/python -m pytest tests/test_kernels.py tests/test_upstream.py tests/test_tools_meter.py \
	  tests/test_tools_resources.py tests/test_benchmarks.py -q -W "ignore:Conversion of an array with ndim:DeprecationWarning"

# Two notebooks at a time (each sets one thread), each notebook's cells in order in one worker.
nbval: $(STAMP)
	$(BIN)/python -m pytest --nbval --nbval-current-env --nbval-sanitize-with .nbval-sanitize.cfg chapters using_celib.ipynb -q \
	  -n 2 --dist loadfile

# nbval again on the floating-point paths of other machines (scalar kernels, one thread, AVX2); see the script.
portability: $(STAMP)
	$(BIN)/python tests/portability.py -j 2

build-strict: $(STAMP)
	rm -rf _build/html _build/.doctrees
	$(BIN)/jupyter-book build -W -n --keep-going .

# Checks the pages built by build-strict in headless Chromium (Debian's packages).
browser: $(STAMP) chromium
	$(BIN)/python -m pytest tests/browser -q

# Debian packages, installed when we may (root or passwordless sudo); where we may not, say how.
# $(call apt_install,<what>,<packages>,<apt-get options>,<then, when we may not>)
define apt_install
if [ "$$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo"; else SUDO="none"; fi; \
if [ "$$SUDO" = none ]; then \
  echo "$(1) is missing and this user cannot install it: sudo apt-get install $(2)" >&2; $(4) \
else \
  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(3) $(2) >/dev/null; \
fi
endef

# Debian's chromium + chromium-driver; where they cannot be installed, the browser tests fail and say so.
chromium:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  $(call apt_install,chromium,chromium chromium-driver,,); \
	fi

# The whole book as one PDF (Jupyter Book's LaTeX builder, xelatex from Debian's TeX Live, installed below
# the way Chromium is), checked (tests/pdf), then linked from the HTML pages. CI runs it after make test.
pdf: $(STAMP) texlive chromium
	rm -rf _build/latex
	$(BIN)/jupyter-book build --quiet . --builder pdflatex
	$(BIN)/python -m pytest tests/pdf -q
	$(BIN)/jupyter-book build --quiet --all .  # the HTML pages again, linking the PDF (_ext/celib_book.py)
	$(BIN)/python -m pytest tests/browser -q -k reachable
	@echo "The PDF: $(CURDIR)/_build/latex/book.pdf"

TEXLIVE_PACKAGES := texlive-latex-recommended texlive-latex-extra texlive-xetex texlive-fonts-recommended \
	latexmk fonts-freefont-otf lmodern tex-gyre poppler-utils
texlive:
	@if ! command -v xelatex >/dev/null || ! command -v latexmk >/dev/null || ! command -v pdftoppm >/dev/null; then \
	  $(call apt_install,TeX Live,$(TEXLIVE_PACKAGES),--no-install-recommends,exit 1;); \
	fi

# Re-execute every chapter in place from a fresh kernel (after changing celib). Cells that demonstrate an
# error carry the raises-exception cell tag; any other error output fails tests/test_notebooks.py.
notebooks: $(STAMP)
	$(BIN)/jupyter nbconvert --to notebook --execute --inplace --allow-errors --ExecutePreprocessor.record_timing=False chapters/*.ipynb using_celib.ipynb
	$(BIN)/python -m pytest tests/test_notebooks.py -q  # catches any error output a cell did not declare

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_cpu.py

clean:
	rm -rf _build
