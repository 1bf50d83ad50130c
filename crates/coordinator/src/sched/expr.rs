//! CEL expressions of matchmaking: compiled once, checked against a cost limit, split into
//! clauses at a top-level `&&` so that a refusal can name the clause that failed, and annotated
//! with the fields they read so that the scheduler knows which clauses it may evaluate once per
//! host class and which it must evaluate per host.

use cel::common::ast::{Expr as Ast, IdedExpr};
use cel::common::value::{CowVal, Val};
use cel::context::VariableResolver;
use cel::{Context, Env, Program, Value};
use std::collections::BTreeSet;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use thiserror::Error;

/// Longest expression accepted, in bytes.
pub const MAX_SOURCE_BYTES: usize = 2048;
/// Deepest nesting accepted (brackets in the source, and AST depth).
pub const MAX_DEPTH: usize = 32;
/// Most AST nodes accepted (after macro expansion).
pub const MAX_NODES: usize = 256;
/// Deepest nesting of comprehensions (`all`, `exists`, `map`, `filter`) accepted.
pub const MAX_COMPREHENSION_NESTING: usize = 2;

/// Fields of `host` that are the same for every host of a class (see `HostClass`).
pub const HOST_CLASS_FIELDS: &[&str] = &["arch", "accel", "qemu_version", "network_modes", "networks", "labels", "cpus", "memory_mib"];
/// Fields of `host` that differ from host to host or from heartbeat to heartbeat.
pub const HOST_OWN_FIELDS: &[&str] = &[
    "name",
    "url",
    "free_cpus",
    "free_memory_mib",
    "load_avg",
    "load_now",
    "load_predicted",
    "cpu_cap",
    "free_cpu_share",
    "cgroups",
    "running_vms",
    "image_cache",
];
/// Fields of `request`.
pub const REQUEST_FIELDS: &[&str] = &["user", "image", "cpus", "memory_mib"];

/// Identifiers CEL treats as type names; they are not variables.
const TYPE_IDENTS: &[&str] = &["int", "uint", "double", "bool", "string", "bytes", "list", "map", "null_type", "type", "dyn"];

static ENV: LazyLock<Arc<Env>> = LazyLock::new(|| Arc::new(Env::stdlib()));
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// What an expression is for; it decides the variable it may use and the type it must yield.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExprKind {
    /// The user's requirement over `host`: a bool.
    Requirement,
    /// The user's rank over `host`: a number, higher is better.
    Rank,
    /// The host owner's policy over `request`: a bool.
    Policy,
}

impl ExprKind {
    /// The one variable expressions of this kind may read.
    pub fn variable(self) -> &'static str {
        match self {
            ExprKind::Requirement | ExprKind::Rank => "host",
            ExprKind::Policy => "request",
        }
    }

    fn fields(self) -> Vec<&'static str> {
        match self {
            ExprKind::Requirement | ExprKind::Rank => HOST_CLASS_FIELDS.iter().chain(HOST_OWN_FIELDS).copied().collect(),
            ExprKind::Policy => REQUEST_FIELDS.to_vec(),
        }
    }
}

impl fmt::Display for ExprKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ExprKind::Requirement => "requirement",
            ExprKind::Rank => "rank",
            ExprKind::Policy => "owner policy",
        })
    }
}

/// Where in the source an error is: 1-based line and column (in characters), and byte offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Position {
    pub line: u32,
    pub column: u32,
    pub offset: usize,
}

impl Position {
    fn at(source: &str, offset: usize) -> Position {
        let offset = offset.min(source.len());
        let before = &source[..floor_char_boundary(source, offset)];
        let line = before.matches('\n').count() as u32 + 1;
        let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
        let column = before[line_start..].chars().count() as u32 + 1;
        Position { line, column, offset }
    }

    fn from_line_column(source: &str, line: isize, column: isize) -> Position {
        let line = line.max(1) as usize;
        let column = column.max(1) as usize;
        let line_start: usize = source.split_inclusive('\n').take(line - 1).map(str::len).sum();
        let rest = source.get(line_start..).unwrap_or("");
        let in_line: usize = rest.chars().take(column - 1).map(char::len_utf8).sum();
        Position { line: line as u32, column: column as u32, offset: line_start + in_line }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}", self.line, self.column)
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Why an expression was refused at compile time (an HTTP 400). Wraps no other error: the
/// CEL parser's diagnosis is kept as its message text, which goes to the client as is.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ExprError {
    #[error("{kind} is empty")]
    Empty { kind: ExprKind },
    /// `message`: the parser's message for its first error (text, as the 400 carries it).
    #[error("{kind} is not valid CEL at {position}: {message}")]
    Syntax { kind: ExprKind, position: Position, message: String },
    #[error("{kind} uses unknown variable `{name}` at {position}; it may use only `{allowed}`")]
    UnknownVariable { kind: ExprKind, name: String, position: Position, allowed: &'static str },
    #[error("{kind} reads `{variable}.{field}` at {position}, which does not exist; fields are: {fields}")]
    UnknownField { kind: ExprKind, variable: &'static str, field: String, position: Position, fields: String },
    #[error("{kind} is over its cost limit at {position}: {what}")]
    TooCostly { kind: ExprKind, position: Position, what: String },
}

impl ExprError {
    /// The kind of expression the error is in.
    pub fn kind(&self) -> ExprKind {
        match self {
            ExprError::Empty { kind }
            | ExprError::Syntax { kind, .. }
            | ExprError::UnknownVariable { kind, .. }
            | ExprError::UnknownField { kind, .. }
            | ExprError::TooCostly { kind, .. } => *kind,
        }
    }

    /// Where the error is, if it is at one place.
    pub fn position(&self) -> Option<Position> {
        match self {
            ExprError::Empty { .. } => None,
            ExprError::Syntax { position, .. }
            | ExprError::UnknownVariable { position, .. }
            | ExprError::UnknownField { position, .. }
            | ExprError::TooCostly { position, .. } => Some(*position),
        }
    }
}

/// Where a clause can be evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Reads only attributes shared by a host class: evaluate once per class and cache.
    Class,
    /// Reads a host's own or dynamic attributes: evaluate per host.
    Host,
}

/// One conjunct of an expression.
#[derive(Debug)]
pub struct Clause {
    /// Unique id (cache key).
    pub id: u64,
    /// Its source text, trimmed.
    pub text: String,
    pub scope: Scope,
    program: Program,
    /// `host.labels.site`-style paths it reads, each with a program that evaluates it (for the
    /// detail of a refusal).
    paths: Vec<(String, Program)>,
}

/// A compiled CEL expression: the conjunction of its clauses (a single clause when its top
/// level is not `&&`).
#[derive(Debug)]
pub struct Expr {
    pub id: u64,
    pub kind: ExprKind,
    pub source: String,
    pub clauses: Vec<Clause>,
    /// Top-level fields of the variable it reads; `None` if it uses the variable as a whole.
    pub fields: Option<BTreeSet<String>>,
    /// The whole expression (used for rank).
    program: Program,
}

/// What evaluating an expression gave, when it was not a plain success.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The requirement holds.
    True,
    /// The clause is false; the detail says what the fields it read held.
    False { clause: String, detail: String, scope: Scope },
    /// The clause could not be evaluated (missing field, wrong type ...): a non-match.
    Error { clause: String, detail: String, scope: Scope },
}

impl Expr {
    /// Compiles `source` as an expression of `kind`, refusing syntax errors, variables other
    /// than the kind's own, unknown fields, and expressions over the cost limit.
    pub fn compile(source: &str, kind: ExprKind) -> Result<Expr, ExprError> {
        if source.trim().is_empty() {
            return Err(ExprError::Empty { kind });
        }
        if source.len() > MAX_SOURCE_BYTES {
            return Err(ExprError::TooCostly {
                kind,
                position: Position::at(source, MAX_SOURCE_BYTES),
                what: format!("{} bytes long, the limit is {MAX_SOURCE_BYTES}", source.len()),
            });
        }
        let split = scan(source, kind)?;
        let program = parse(source, kind)?;
        let mut walk = Walk::new(kind, source, &program);
        walk.expr(program.expression(), 1, 0, &mut Vec::new())?;
        if walk.nodes > MAX_NODES {
            return Err(ExprError::TooCostly {
                kind,
                position: Position::at(source, 0),
                what: format!("{} nodes, the limit is {MAX_NODES}", walk.nodes),
            });
        }
        let fields = if walk.whole { None } else { Some(walk.fields.clone()) };

        // Clauses: the conjuncts of a top-level `&&`, with their text from the source.
        let conjuncts = count_conjuncts(program.expression());
        let mut clauses = Vec::new();
        if conjuncts > 1 && split.len() == conjuncts {
            for (start, end) in split {
                let text = source[start..end].trim();
                match clause(text, kind) {
                    Some(c) => clauses.push(c),
                    None => {
                        clauses.clear();
                        break;
                    }
                }
            }
        }
        if clauses.is_empty() {
            clauses.push(clause(source.trim(), kind).ok_or_else(|| ExprError::Syntax {
                kind,
                position: Position::at(source, 0),
                message: "could not be compiled".into(),
            })?);
        }
        Ok(Expr { id: NEXT_ID.fetch_add(1, Ordering::Relaxed), kind, source: source.to_string(), clauses, fields, program })
    }

    /// Whether any clause must be evaluated per host.
    pub fn has_host_scope(&self) -> bool {
        self.clauses.iter().any(|c| c.scope == Scope::Host)
    }

    /// Evaluates the clauses of `scope` (or all, with `None`) in order against `value` bound to
    /// the kind's variable; the first false or failing clause is the outcome.
    pub fn check(&self, value: &dyn Val, scope: Option<Scope>) -> Outcome {
        for c in &self.clauses {
            if scope.is_some_and(|s| s != c.scope) {
                continue;
            }
            if let Some(outcome) = c.check(self.kind, value) {
                return outcome;
            }
        }
        Outcome::True
    }

    /// Evaluates a rank expression: a number, or why not.
    pub fn rank(&self, value: &dyn Val) -> Result<f64, String> {
        match execute(&self.program, self.kind.variable(), value)? {
            Value::Int(i) => Ok(i as f64),
            Value::UInt(u) => Ok(u as f64),
            Value::Float(f) if f.is_nan() => Err("rank is NaN".into()),
            Value::Float(f) => Ok(f),
            other => Err(format!("rank evaluated to {}, not a number", type_name(&other))),
        }
    }
}

impl Clause {
    /// `None` if the clause holds.
    fn check(&self, kind: ExprKind, value: &dyn Val) -> Option<Outcome> {
        let var = kind.variable();
        match execute(&self.program, var, value) {
            Ok(Value::Bool(true)) => None,
            Ok(Value::Bool(false)) => {
                Some(Outcome::False { clause: self.text.clone(), detail: self.describe(var, value, "is false"), scope: self.scope })
            }
            Ok(other) => Some(Outcome::Error {
                clause: self.text.clone(),
                detail: format!("evaluated to {}, not a bool", type_name(&other)),
                scope: self.scope,
            }),
            Err(e) => Some(Outcome::Error { clause: self.text.clone(), detail: e, scope: self.scope }),
        }
    }

    fn describe(&self, var: &str, value: &dyn Val, head: &str) -> String {
        let mut out = head.to_string();
        for (i, (path, program)) in self.paths.iter().take(3).enumerate() {
            out.push_str(if i == 0 { ": " } else { ", " });
            match execute(program, var, value) {
                Ok(v) => out.push_str(&format!("{path} is {}", show(&v))),
                Err(_) => out.push_str(&format!("{path} is missing")),
            }
        }
        out
    }
}

/// Binds one variable to a borrowed value.
struct One<'a> {
    name: &'a str,
    value: &'a (dyn Val + 'a),
}

impl VariableResolver for One<'_> {
    fn resolve<'b>(&'b self, variable: &str) -> Option<CowVal<'b, 'b>> {
        (variable == self.name).then_some(CowVal::Borrowed(self.value))
    }
}

thread_local! {
    /// This thread's copy of [`ENV`] (the same standard environment): evaluations on different
    /// threads do not contend for one reference count.
    static THREAD_ENV: Arc<Env> = Arc::new(Env::stdlib());
}

fn execute(program: &Program, var: &str, value: &dyn Val) -> Result<Value, String> {
    let resolver = One { name: var, value };
    let run = || {
        let mut ctx = Context::with_env(THREAD_ENV.with(Arc::clone));
        ctx.set_variable_resolver(&resolver);
        program.execute(&ctx)
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("evaluation failed (interpreter panic)".into()),
    }
}

fn parse(source: &str, kind: ExprKind) -> Result<Program, ExprError> {
    let parsed = std::panic::catch_unwind(|| ENV.compile(source));
    match parsed {
        Ok(Ok(p)) => Ok(p),
        Ok(Err(errors)) => {
            let first = errors.errors.first();
            let position = first.map(|e| Position::from_line_column(source, e.pos.0, e.pos.1)).unwrap_or_else(|| Position::at(source, 0));
            let message = first.map(|e| e.msg.clone()).unwrap_or_else(|| "syntax error".into());
            Err(ExprError::Syntax { kind, position, message })
        }
        Err(_) => Err(ExprError::Syntax { kind, position: Position::at(source, 0), message: "the parser failed on this input".into() }),
    }
}

fn clause(text: &str, kind: ExprKind) -> Option<Clause> {
    let program = parse(text, kind).ok()?;
    let mut walk = Walk::new(kind, text, &program);
    walk.expr(program.expression(), 1, 0, &mut Vec::new()).ok()?;
    let class_only = !walk.whole && walk.fields.iter().all(|f| HOST_CLASS_FIELDS.contains(&f.as_str())) && kind != ExprKind::Policy;
    let scope = if class_only { Scope::Class } else { Scope::Host };
    let paths = walk.paths.iter().filter_map(|p| ENV.compile(p).ok().map(|prog| (p.clone(), prog))).collect();
    Some(Clause { id: NEXT_ID.fetch_add(1, Ordering::Relaxed), text: text.to_string(), scope, program, paths })
}

fn count_conjuncts(e: &IdedExpr) -> usize {
    match &e.expr {
        Ast::Call(call) if call.func_name == "_&&_" && call.target.is_none() => call.args.iter().map(count_conjuncts).sum(),
        _ => 1,
    }
}

/// Checks bracket nesting before the parser sees the source, and returns the byte ranges of the
/// pieces between top-level `&&` tokens (strings and brackets skipped).
fn scan(source: &str, kind: ExprKind) -> Result<Vec<(usize, usize)>, ExprError> {
    let b = source.as_bytes();
    let mut pieces = Vec::new();
    let (mut i, mut depth, mut start) = (0usize, 0usize, 0usize);
    while i < b.len() {
        let c = b[i];
        if c == b'\'' || c == b'"' {
            let raw = i > 0 && (b[i - 1] == b'r' || b[i - 1] == b'R');
            let triple = b.len() >= i + 3 && b[i + 1] == c && b[i + 2] == c;
            let mut j = if triple { i + 3 } else { i + 1 };
            loop {
                if j >= b.len() {
                    break; // unterminated: the parser will say so
                }
                if !raw && b[j] == b'\\' {
                    j += 2;
                    continue;
                }
                if triple {
                    if b[j] == c && b.len() >= j + 3 && b[j + 1] == c && b[j + 2] == c {
                        j += 3;
                        break;
                    }
                } else if b[j] == c {
                    j += 1;
                    break;
                }
                j += 1;
            }
            i = j;
            continue;
        }
        match c {
            b'(' | b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(ExprError::TooCostly {
                        kind,
                        position: Position::at(source, i),
                        what: format!("nested more than {MAX_DEPTH} deep"),
                    });
                }
            }
            b')' | b']' | b'}' => depth = depth.saturating_sub(1),
            b'&' if depth == 0 && b.get(i + 1) == Some(&b'&') => {
                pieces.push((start, i));
                start = i + 2;
                i += 2;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    pieces.push((start, b.len()));
    Ok(pieces)
}

/// Walks an AST: counts nodes and depth, checks variables and fields, records what is read.
struct Walk<'a> {
    kind: ExprKind,
    var: &'static str,
    source: &'a str,
    program: &'a Program,
    nodes: usize,
    whole: bool,
    fields: BTreeSet<String>,
    paths: Vec<String>,
}

impl<'a> Walk<'a> {
    fn new(kind: ExprKind, source: &'a str, program: &'a Program) -> Self {
        Walk { kind, var: kind.variable(), source, program, nodes: 0, whole: false, fields: BTreeSet::new(), paths: Vec::new() }
    }

    fn pos(&self, id: u64) -> Position {
        let offset = self.program.source_info().offset_for(id).map(|(s, _)| s as usize).unwrap_or(0);
        Position::at(self.source, offset)
    }

    fn costly(&self, id: u64, what: String) -> ExprError {
        ExprError::TooCostly { kind: self.kind, position: self.pos(id), what }
    }

    fn field(&mut self, id: u64, field: &str, path: String) -> Result<(), ExprError> {
        let known = self.kind.fields();
        if !known.contains(&field) {
            return Err(ExprError::UnknownField {
                kind: self.kind,
                variable: self.var,
                field: field.to_string(),
                position: self.pos(id),
                fields: known.join(", "),
            });
        }
        self.fields.insert(field.to_string());
        if !self.paths.contains(&path) {
            self.paths.push(path);
        }
        Ok(())
    }

    fn expr(&mut self, e: &IdedExpr, depth: usize, compr: usize, scope: &mut Vec<String>) -> Result<(), ExprError> {
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err(self.costly(e.id, format!("more than {MAX_NODES} nodes")));
        }
        if depth > MAX_DEPTH {
            return Err(self.costly(e.id, format!("nested more than {MAX_DEPTH} deep")));
        }
        match &e.expr {
            Ast::Ident(name) => {
                if scope.iter().any(|s| s == name) || TYPE_IDENTS.contains(&name.as_str()) {
                } else if name == self.var {
                    self.whole = true;
                } else {
                    return Err(ExprError::UnknownVariable {
                        kind: self.kind,
                        name: name.clone(),
                        position: self.pos(e.id),
                        allowed: self.var,
                    });
                }
            }
            Ast::Select(sel) => {
                // A chain of selections on the variable: `host.labels.site`.
                let mut segs = vec![sel.field.as_str()];
                let mut cur = &*sel.operand;
                while let Ast::Select(inner) = &cur.expr {
                    if inner.test {
                        break;
                    }
                    segs.push(inner.field.as_str());
                    cur = &inner.operand;
                }
                match &cur.expr {
                    Ast::Ident(name) if name == self.var && !scope.iter().any(|s| s == name) => {
                        segs.reverse();
                        let path = format!("{}.{}", self.var, segs.join("."));
                        self.nodes += segs.len();
                        self.field(e.id, segs[0], path)?;
                    }
                    _ => self.expr(&sel.operand, depth + 1, compr, scope)?,
                }
            }
            Ast::Call(call) => {
                if let Some(t) = &call.target {
                    self.expr(t, depth + 1, compr, scope)?;
                }
                for a in &call.args {
                    self.expr(a, depth + 1, compr, scope)?;
                }
            }
            Ast::Comprehension(c) => {
                if compr + 1 > MAX_COMPREHENSION_NESTING {
                    return Err(self.costly(e.id, format!("comprehensions nested more than {MAX_COMPREHENSION_NESTING} deep")));
                }
                self.expr(&c.iter_range, depth + 1, compr, scope)?;
                self.expr(&c.accu_init, depth + 1, compr, scope)?;
                let n = scope.len();
                scope.push(c.iter_var.clone());
                if let Some(v) = &c.iter_var2 {
                    scope.push(v.clone());
                }
                scope.push(c.accu_var.clone());
                self.expr(&c.loop_cond, depth + 1, compr + 1, scope)?;
                self.expr(&c.loop_step, depth + 1, compr + 1, scope)?;
                self.expr(&c.result, depth + 1, compr + 1, scope)?;
                scope.truncate(n);
            }
            Ast::List(l) => {
                for x in &l.elements {
                    self.expr(x, depth + 1, compr, scope)?;
                }
            }
            Ast::Map(m) => {
                for entry in &m.entries {
                    if let cel::common::ast::EntryExpr::MapEntry(me) = &entry.expr {
                        self.expr(&me.key, depth + 1, compr, scope)?;
                        self.expr(&me.value, depth + 1, compr, scope)?;
                    }
                }
            }
            Ast::Struct(s) => {
                for entry in &s.entries {
                    if let cel::common::ast::EntryExpr::StructField(f) = &entry.expr {
                        self.expr(&f.value, depth + 1, compr, scope)?;
                    }
                }
            }
            Ast::Literal(_) | Ast::Unspecified => {}
        }
        Ok(())
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::List(_) => "a list",
        Value::Map(_) => "a map",
        Value::Function(..) => "a function",
        Value::Int(_) => "an int",
        Value::UInt(_) => "a uint",
        Value::Float(_) => "a double",
        Value::String(_) => "a string",
        Value::Bytes(_) => "bytes",
        Value::Bool(_) => "a bool",
        Value::Null => "null",
        _ => "a value",
    }
}

/// A short rendering of a value for a refusal's detail.
fn show(v: &Value) -> String {
    let s = match v {
        Value::String(s) => format!("{:?}", s.as_str()),
        Value::Int(i) => i.to_string(),
        Value::UInt(u) => u.to_string(),
        Value::Float(f) => f.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => "null".into(),
        Value::List(l) => format!("[{}]", l.iter().map(show).collect::<Vec<_>>().join(", ")),
        Value::Map(m) => {
            let mut items: Vec<String> = m.map.iter().map(|(k, v)| format!("{}: {}", show(&Value::from(k)), show(v))).collect();
            items.sort();
            format!("{{{}}}", items.join(", "))
        }
        other => format!("{other:?}"),
    };
    if s.len() > 120 {
        format!("{}...", &s[..floor_char_boundary(&s, 117)])
    } else {
        s
    }
}

/// Values for the interpreter, built directly (no intermediate [`Value`]): the host values are
/// rebuilt whenever a host's free figures change.
pub(crate) mod val {
    use cel::common::types::{CelDouble, CelInt, CelList, CelMap, CelMapKey, CelString};
    use cel::common::value::Val;
    use std::collections::{BTreeMap, HashMap};

    pub fn map(fields: Vec<(&'static str, Box<dyn Val>)>) -> Box<dyn Val> {
        let m: HashMap<CelMapKey<'static>, Box<dyn Val>> = fields.into_iter().map(|(k, v)| (CelMapKey::from(k), v)).collect();
        Box::new(CelMap::from(m))
    }
    pub fn string(s: &str) -> Box<dyn Val> {
        Box::new(CelString::from(s.to_string()))
    }
    pub fn int(i: u64) -> Box<dyn Val> {
        Box::new(CelInt::from(i.min(i64::MAX as u64) as i64))
    }
    pub fn double(f: f64) -> Box<dyn Val> {
        Box::new(CelDouble::from(f))
    }
    pub fn strings(v: &[String]) -> Box<dyn Val> {
        Box::new(CelList::from(v.iter().map(|s| string(s)).collect::<Vec<_>>()))
    }
    pub fn string_map(m: &BTreeMap<String, String>) -> Box<dyn Val> {
        Box::new(CelMap::from(m.iter().map(|(k, v)| (CelMapKey::from(k.clone()), string(v))).collect::<HashMap<_, _>>()))
    }
    pub fn double_map(m: &BTreeMap<String, f64>) -> Box<dyn Val> {
        Box::new(CelMap::from(m.iter().map(|(k, v)| (CelMapKey::from(k.clone()), double(*v))).collect::<HashMap<_, _>>()))
    }
}
