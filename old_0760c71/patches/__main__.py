from . import markdown

print(markdown())
