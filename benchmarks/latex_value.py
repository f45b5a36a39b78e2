r"""benchmarks/latex_value.py: the number MATH-V's official scorer reads from an answer string, or None.

MATH-V's is_equal (mathllm/MATH-V, evaluation/utils.py) compares round(eval(str(latex2sympy(s))), 2) of both
answers, with the math module's names in scope; latex2sympy is latex2sympy2's ANTLR grammar. This file is our
own reading of that pipeline for the LaTeX that answers contain, checked value by value against it:
  - the parser takes the longest well-formed expression at the start and ignores the rest, so '3}',
    '3. the answer', '625 \rightarrow 626' and '1 triangle' ('tr' is one of its function names) are numbers;
  - a character or command its lexer does not know ('%', '"', '°', π, '\boxed', '\circ') ends in an error
    when the parser reads it, that is anywhere inside the expression or just after it: no value;
  - adjacent factors multiply, so a mixed number '12\frac{1}{2}' is 6, and '111 111 111' is 111³;
  - a letter left in the expression (x, 'cm', \alpha, \text{...}, bare e) names nothing in scope: no value;
    e^{x} is exp(x); \pi is π; \csc, \sec, \cot, \ln, \infty, |x|, \binom and '=' also name nothing;
  - 'a < b' and 'a \geq b' evaluate to True or False, i.e. 1 or 0; a list 'a, b' has no value.
Known gaps: a percent or a bare e in a denominator (sympy prints those in forms we do not follow).
"""
import math
import operator
import re
from fractions import Fraction
from functools import lru_cache

FUNCS = {"\\sin": math.sin, "\\cos": math.cos, "\\tan": math.tan, "\\arcsin": math.asin, "\\arccos": math.acos,
         "\\arctan": math.atan, "\\sinh": math.sinh, "\\cosh": math.cosh, "\\tanh": math.tanh, "\\exp": math.exp,
         "\\log": None, "\\csc": "free", "\\sec": "free", "\\cot": "free", "\\ln": "free"}
OPERATORS = {"*", "/", ":", "\\times", "\\cdot", "\\div", "\\over", "\\mod"}
COMPARE = {"<": operator.lt, ">": operator.gt, "<=": operator.le, ">=": operator.ge}
RELATIONS = {"<": "<", ">": ">", "\\le": "<=", "\\leq": "<=", "\\leqslant": "<=", "\\ge": ">=", "\\geq": ">=",
             "\\geqslant": ">=", "=": None, "==": None, "\\equiv": None, "\\ne": None, "\\neq": None, "\\in": None,
             "!=": None, ",": None, ";": None}
STOPS = {"^", ".", ")", "]", "}", "\\}", "\\right", "\\rgroup", "\\rbrace", "\\rbrack", "\\rfloor", "\\rceil", "&", "\\\\",
         "_", "'", "E", "\\to", "\\rightarrow", "\\Rightarrow", "\\longrightarrow", "\\Longrightarrow",
         "\\leftrightarrow", "\\Leftrightarrow", "\\choose", "\\end", "\\lrcorner", "\\urcorner", "\\rvert"}
OPENERS = {"(": ")", "[": "]", "{": "}", "\\{": "\\}", "\\lgroup": "\\rgroup", "\\lbrace": "\\rbrace", "\\lbrack": "\\rbrack"}
FREE_COMMANDS = {"\\alpha", "\\beta", "\\gamma", "\\Gamma", "\\delta", "\\Delta", "\\epsilon", "\\varepsilon", "\\zeta",
                 "\\eta", "\\theta", "\\Theta", "\\vartheta", "\\iota", "\\kappa", "\\lambda", "\\Lambda", "\\mu", "\\nu",
                 "\\xi", "\\Xi", "\\omicron", "\\Pi", "\\varpi", "\\rho", "\\varrho", "\\sigma", "\\Sigma", "\\varsigma",
                 "\\tau", "\\upsilon", "\\Upsilon", "\\phi", "\\Phi", "\\varphi", "\\chi", "\\psi", "\\Psi", "\\omega",
                 "\\Omega", "\\infty", "\\partial", "\\emptyset", "\\angle", "\\triangle", "\\square", "\\prime",
                 "\\ell", "\\nabla", "\\text", "\\textit", "\\textbf", "\\mathrm", "\\mathbf", "\\mathit", "\\mathbb",
                 "\\mathcal", "\\mathsf", "\\bar", "\\overline", "\\hat", "\\vec", "\\tilde", "\\dot", "\\boldsymbol",
                 "\\bm", "\\binom", "\\dbinom", "\\tbinom", "\\lvert", "\\vert", "\\|", "\\lfloor", "\\lceil"}
KNOWN = (set(FUNCS) | OPERATORS | set(RELATIONS) | STOPS | set(OPENERS) | FREE_COMMANDS
         | {"\\frac", "\\sqrt", "\\pi", "\\left"})
# Letter runs that latex2sympy2's lexer reads as one function-name token: they cannot start a factor.
NAMES = sorted("gcd lcm floor ceil eye zeros ones cols rows diag norm rank trace tr rref hstack vstack orth ortho "
               "orthogonal orthogonalize nullspace eig eigen diagonalize eigenvals eigenvalues eigenvects eigenvectors "
               "svd SVD arsinh arcsinh arcosh arccosh artanh arctanh matrix pmatrix bmatrix vmatrix".split(),
               key=len, reverse=True)
TOKEN = re.compile(r"\s*(?:(?P<num>(?:\d+(?:,\d{3})*)?\.\d+|\d+(?:,\d{3})*)(?P<pct>\\%)?"
                   r"|(?P<cmd>\\[a-zA-Z]+|\\[{}|\\])|(?P<word>[a-zA-Z]+)|(?P<op>==|!=|[-+*/:^!()\[\]{}|<>=,;.&_']))")


class NoValue(Exception):
    """The official pipeline computes no value: a parse error, an unknown name, or no number at all."""


def _tokens(s):
    """latex2sympy2's lexer, lazily (the parser reads one token past the expression, so an unknown
    character there is still an error, one further on is never read): (kind, text, number) tuples."""
    i = 0
    while True:
        m = TOKEN.match(s, i)
        if s[i:].strip() == "":
            yield ("end", "", None)
            return
        if not m or m.end() == i:
            raise NoValue(f"unknown character {s[i:].strip()[:1]!r}")
        i = m.end()
        if m["num"]:
            n = Fraction(m["num"].replace(",", "")) / (100 if m["pct"] else 1)
            yield ("num", m["num"], n)
        elif m["cmd"]:
            known = [c for c in KNOWN if m["cmd"].startswith(c) and c[1:].isalpha()] or [m["cmd"]] * (m["cmd"] in KNOWN)
            if not known:
                raise NoValue(f"unknown command {m['cmd']}")
            cmd = max(known, key=len)
            i -= len(m["cmd"]) - len(cmd)
            yield ("cmd", cmd, None)
        elif m["word"]:
            w = m["word"]
            name = next((n for n in NAMES if w.startswith(n)), None)
            text = name or ("dx" if w[0] == "d" and len(w) > 1 else w[0])
            i -= len(w) - len(text)
            yield ("stop" if name or text == "E" else "e" if text == "e" else "free", text, None)
        else:
            yield ("op", m["op"], None)


class _Parser:
    """Recursive descent over the grammar's arithmetic: relation > additive > multiplicative > unary >
    implicit product of powers > atom. Values are Fractions until an irrational step makes them floats."""

    def __init__(self, s):
        self.toks, self.free, self.inexact = _tokens(s), False, False   # inexact: Python's eval gives a float
        self.next()

    def next(self):
        self.kind, self.text, self.num = next(self.toks)

    def expect(self, text):
        if self.text != text:
            raise NoValue(f"expected {text!r}, got {self.text!r}")
        self.next()

    def starts_factor(self, nofunc=False):
        """Adjacent factors multiply; a function's argument without parentheses holds no function (\\sqrt, e^)."""
        if self.kind == "e" or self.text in FUNCS or self.text == "\\sqrt":
            return not nofunc
        return self.kind in ("num", "free") or self.text in OPENERS or self.text in (
            "\\frac", "\\pi", "\\left", "|") or self.text in FREE_COMMANDS

    def relation(self):
        value = self.additive()
        if self.text in RELATIONS:
            op = RELATIONS[self.text]
            self.next()
            right = self.relation()
            if op is None:
                raise NoValue("an equation or a list has no value")
            return Fraction(int(COMPARE[op](value, right)))    # True / False, which round() reads as 1 / 0
        return value

    def additive(self):
        value = self.multiplicative()
        while self.text in ("+", "-"):
            sign = 1 if self.text == "+" else -1
            self.next()
            value = value + sign * self.multiplicative()
        return value

    def multiplicative(self, nofunc=False):
        value = self.unary(nofunc)
        while self.text in OPERATORS:
            op = self.text
            self.next()
            right = self.unary(nofunc)
            if op == "\\mod":
                raise NoValue("Mod is not a name in scope")
            self.inexact |= op not in ("*", "\\times", "\\cdot")
            value = value * right if op in ("*", "\\times", "\\cdot") else _div(value, right)
        return value

    def unary(self, nofunc=False):
        if self.text in ("+", "-"):
            sign = 1 if self.text == "+" else -1
            self.next()
            return sign * self.unary(nofunc)
        value = self.power()
        while self.starts_factor(nofunc):
            value = value * self.power()
        return value

    def power(self):
        """Powers, then factorials; a ^ after a factorial ends the expression, as in the grammar."""
        value = self.atom()
        while self.text == "^":
            self.next()
            exponent = self.operand()
            self.inexact |= exponent < 0
            value = _pow(value, exponent)
        while self.text == "!":
            self.next()
            value = Fraction(math.factorial(_int(value)))
        return value

    def operand(self):
        """What ^, _ and \\log_ take: {expression}, or a number, letter or \\pi (no function, fraction or group)."""
        if self.text == "{":
            self.next()
            return self.group("}")
        if self.kind in ("num", "free") or self.text == "\\pi" or self.text in FREE_COMMANDS:
            return self.atom()
        raise NoValue(f"{self.text!r} cannot be an exponent or index")

    def group(self, close):
        value = self.additive()
        self.expect(close)
        return value

    def atom(self):
        kind, text, num = self.kind, self.text, self.num
        if kind in ("end", "stop"):
            raise NoValue(f"an expression cannot start with {text!r}")
        self.next()
        if kind == "num":
            self.inexact |= num.denominator != 1
            return num
        if kind == "free":
            self.free = True
            return Fraction(1)
        if kind == "e":
            if self.text != "^":
                self.free = True                     # bare e is sympy's E, a name not in scope
                return Fraction(1)
            self.next()
            exponent = self.operand()
            self.free |= exponent == 1                  # sympy prints exp(1) as E, again no name in scope
            return math.exp(exponent)
        if text in OPENERS:
            return self.group(OPENERS[text])
        if text == "\\left":
            opener = self.text
            self.next()
            if opener not in OPENERS:
                raise NoValue("\\left without a bracket we evaluate")
            value = self.additive()
            self.expect("\\right")
            self.expect(OPENERS[opener])
            return value
        if text == "\\pi":
            return math.pi
        if text == "\\frac":
            self.expect("{")
            upper = self.group("}")
            self.expect("{")
            self.inexact = True
            return _div(upper, self.group("}"))
        if text == "\\sqrt":
            root = 2
            if self.text == "[":
                self.next()
                root = self.group("]")
            self.expect("{")
            return _pow(self.group("}"), _div(Fraction(1), root))
        if text in FUNCS:
            return self.function(text)
        if text in FREE_COMMANDS or text == "|":
            self.free = True
            raise NoValue(f"{text} names nothing in scope")
        raise NoValue(f"{text!r} cannot start an expression")

    def function(self, name):
        base = 10
        if name == "\\log" and self.text == "_":
            self.next()
            base = self.operand()
        if self.text == "(":
            self.next()
            arg = self.group(")")
        else:
            arg = self.multiplicative(nofunc=True)
        if FUNCS[name] == "free":
            raise NoValue(f"{name} is not a name in scope")
        return math.log(arg, base) if name == "\\log" else FUNCS[name](arg)


def _int(v):
    if v != int(v):
        raise NoValue("factorial of a non-integer")
    return int(v)


def _div(a, b):
    if b == 0:
        raise NoValue("division by zero")
    return Fraction(a) / Fraction(b) if isinstance(a, Fraction) and isinstance(b, Fraction) else a / b


def _pow(a, b):
    if b == int(b) and abs(b) <= 4096:
        return a ** int(b)
    if a < 0:
        raise NoValue("a root of a negative number is complex")
    return float(a) ** float(b)


@lru_cache(maxsize=None)
def latex_value(s):
    """MATH-V's value of an answer string, round(eval(str(latex2sympy(s))), 2) officially, or None."""
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    for filler in ("\\displaystyle", "\\qquad", "\\quad", "~", "\\,", "$"):      # what latex2sympy2 erases first
        s = s.replace(filler, " ")
    try:
        p = _Parser(s)
        value = p.relation()
        if p.kind not in ("end", "stop") and p.text not in STOPS:
            raise NoValue(f"{p.text!r} after the expression")
        if p.free or isinstance(value, complex):
            return None
        if isinstance(value, Fraction) and value.denominator == 1 and not p.inexact:
            return int(value)
        v = float(value)
    except (NoValue, ArithmeticError, ValueError, TypeError):
        return None
    return None if math.isnan(v) or math.isinf(v) else round(v, 2)
