//! Credit policies as data.
//!
//! A policy file (TOML, under `pipelines/policies/`) names a product and its version and
//! holds SQL expressions over the columns of `merchant_features`:
//!
//! * `[params]`: named numbers every expression may use (`k = 0.5`);
//! * `[[eligibility]]`: `require` must be true, else the merchant is declined with `code`;
//! * `[[refer]]`: when `when` is true the application goes to a person, with `code`;
//! * `[limit]`: `[[limit.terms]]` named intermediate amounts, each usable by later ones, a
//!   `base` amount in fen, `[[limit.caps]]` upper bounds with the code reported when one
//!   binds, `round_down_fen` and `minimum_fen`.
//!
//! [`Policy::parse`] checks the whole file before anything runs — structure, reason codes,
//! names, that every expression is one SQL expression, that it plans against the feature
//! table and has the right type — and reports every problem at once.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use streetflow_core::tables::MERCHANT_FEATURES;
use streetflow_lake::arrow::datatypes::DataType;
use streetflow_lake::datafusion::datasource::MemTable;
use streetflow_lake::datafusion::logical_expr::LogicalPlan;
use streetflow_lake::datafusion::prelude::SessionContext;
use streetflow_lake::datafusion::sql::sqlparser::dialect::GenericDialect;
use streetflow_lake::datafusion::sql::sqlparser::parser::Parser;
use streetflow_lake::datafusion::sql::sqlparser::tokenizer::Token;

/// Reason code of a merchant whose computed limit is below the product's minimum.
pub const LIMIT_BELOW_MINIMUM: &str = "LIMIT_BELOW_MINIMUM";

/// One problem in a policy file, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyProblem {
    /// Where: `eligibility[2]`, `limit.caps[0].sql`, `params.k`, …
    pub location: String,
    /// What is wrong, in plain words.
    pub message: String,
}

impl fmt::Display for PolicyProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location, self.message)
    }
}

/// Every problem found in a policy file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PolicyErrors {
    /// The file (or `<inline>`).
    pub source_name: String,
    /// All problems, in file order.
    pub problems: Vec<PolicyProblem>,
}

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} has {} problem(s):",
            self.source_name,
            self.problems.len()
        )?;
        for problem in &self.problems {
            write!(f, "\n  - {problem}")?;
        }
        Ok(())
    }
}

// The file as written: everything optional, so that missing parts are reported together
// with every other problem instead of one serde error at a time.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    product: Option<ProductFile>,
    #[serde(default)]
    params: BTreeMap<String, toml::Value>,
    #[serde(default)]
    eligibility: Vec<RuleFile>,
    #[serde(default)]
    refer: Vec<RuleFile>,
    limit: Option<LimitFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProductFile {
    id: Option<String>,
    name: Option<String>,
    version: Option<String>,
    #[serde(default)]
    description: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    code: Option<String>,
    require: Option<String>,
    when: Option<String>,
    #[serde(default)]
    explain: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitFile {
    #[serde(default)]
    terms: Vec<TermFile>,
    base: Option<String>,
    #[serde(default)]
    caps: Vec<CapFile>,
    round_down_fen: Option<i64>,
    minimum_fen: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TermFile {
    name: Option<String>,
    sql: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CapFile {
    code: Option<String>,
    sql: Option<String>,
    #[serde(default)]
    explain: String,
}

/// The product a policy decides for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Product {
    /// Stable identifier, e.g. `district-turnover-loan`.
    pub id: String,
    /// Name for people.
    pub name: String,
    /// Version of the policy, e.g. `2026.1`.
    pub version: String,
    /// What the product is.
    pub description: String,
}

/// A rule: a boolean SQL expression and the reason code it emits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Stable reason code, e.g. `HISTORY_TOO_SHORT`.
    pub code: String,
    /// Boolean SQL expression over the feature columns and params.
    pub sql: String,
    /// What the code means, for the officer reading it.
    pub explain: String,
    /// Feature columns the rule reads (through terms, too): shown next to the reason.
    pub features: Vec<String>,
}

/// A named intermediate amount of the limit formula.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Term {
    /// Column name later expressions use.
    pub name: String,
    /// Numeric SQL expression.
    pub sql: String,
}

/// An upper bound on the limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cap {
    /// Code reported when this cap is what bounds the limit.
    pub code: String,
    /// Numeric SQL expression (fen).
    pub sql: String,
    /// What the cap is.
    pub explain: String,
}

/// How the limit is computed: `min(base, caps…)`, rounded down, zero below the minimum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitFormula {
    /// Intermediate amounts, in order.
    pub terms: Vec<Term>,
    /// The affordable amount in fen.
    pub base: String,
    /// Upper bounds.
    pub caps: Vec<Cap>,
    /// The limit is a multiple of this (fen).
    pub round_down_fen: i64,
    /// Below this the merchant is declined with [`LIMIT_BELOW_MINIMUM`].
    pub minimum_fen: i64,
}

/// A checked policy, ready to run.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// The product.
    pub product: Product,
    /// Named numbers, as SQL literals.
    pub params: BTreeMap<String, ParamValue>,
    /// Rules a merchant must meet (each failing one is a decline reason).
    pub eligibility: Vec<Rule>,
    /// Rules that send the application to a person.
    pub refer: Vec<Rule>,
    /// The limit formula.
    pub limit: LimitFormula,
    /// SHA-256 of the file's bytes, hex: which exact policy decided.
    pub content_hash: String,
}

/// A parameter's value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ParamValue {
    /// A whole number (BIGINT).
    Integer(i64),
    /// A real number (DOUBLE).
    Real(f64),
}

impl ParamValue {
    /// The value as a typed SQL literal.
    pub fn sql(&self) -> String {
        match self {
            ParamValue::Integer(n) => format!("CAST({n} AS BIGINT)"),
            ParamValue::Real(x) => format!("CAST({x:?} AS DOUBLE)"),
        }
    }
}

fn is_code(code: &str) -> bool {
    let mut chars = code.chars();
    chars.next().is_some_and(|c| c.is_ascii_uppercase())
        && chars.all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

fn is_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Parses `sql` as exactly one SQL expression (nothing after it).
fn single_expression(sql: &str) -> Result<(), String> {
    let dialect = GenericDialect {};
    let mut parser = Parser::new(&dialect)
        .try_with_sql(sql)
        .map_err(|e| format!("does not parse: {e}"))?;
    parser
        .parse_expr()
        .map_err(|e| format!("does not parse: {e}"))?;
    match parser.peek_token().token {
        Token::EOF => Ok(()),
        other => Err(format!(
            "is more than one SQL expression (unexpected {other} after it)"
        )),
    }
}

/// What kind of value an expression must have.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Expect {
    Boolean,
    Number,
}

/// Plans expressions against the feature table plus params and terms.
struct Checker {
    ctx: SessionContext,
    /// SQL of the relation expressions are checked against.
    relation: String,
    feature_columns: BTreeSet<String>,
    /// Feature columns each term reads.
    term_features: BTreeMap<String, BTreeSet<String>>,
}

impl Checker {
    fn new(params: &BTreeMap<String, ParamValue>) -> Result<Self, String> {
        let ctx = SessionContext::new();
        let schema = MERCHANT_FEATURES.schema.clone();
        let table = MemTable::try_new(schema.clone(), vec![vec![]]).map_err(|e| e.to_string())?;
        ctx.register_table("merchant_features", Arc::new(table))
            .map_err(|e| e.to_string())?;
        let feature_columns = schema.fields().iter().map(|f| f.name().clone()).collect();
        Ok(Self {
            ctx,
            relation: compile_base_relation(params, "merchant_features", None),
            feature_columns,
            term_features: BTreeMap::new(),
        })
    }

    /// Plans `sql`; returns the feature columns it reads.
    async fn check(&self, sql: &str, expect: Expect) -> Result<BTreeSet<String>, String> {
        single_expression(sql)?;
        let query = format!("SELECT ({sql}) AS value FROM ({}) f", self.relation);
        let frame = self
            .ctx
            .sql(&query)
            .await
            .map_err(|e| plain(&e.to_string()))?;
        let data_type = frame.schema().field(0).data_type().clone();
        let ok = match expect {
            Expect::Boolean => matches!(data_type, DataType::Boolean | DataType::Null),
            Expect::Number => data_type.is_numeric() || data_type == DataType::Null,
        };
        if !ok {
            return Err(format!(
                "must be {} but is {data_type}",
                match expect {
                    Expect::Boolean => "true or false",
                    Expect::Number => "a number",
                }
            ));
        }
        let mut features = BTreeSet::new();
        if let LogicalPlan::Projection(projection) = frame.logical_plan() {
            for expr in &projection.expr {
                for column in expr.column_refs() {
                    let name = column.name.clone();
                    if let Some(via) = self.term_features.get(&name) {
                        features.extend(via.iter().cloned());
                    } else if self.feature_columns.contains(&name) {
                        features.insert(name);
                    }
                }
            }
        }
        Ok(features)
    }

    /// Makes a term visible to later expressions (as NULL when it did not check, so
    /// later expressions are still checked).
    fn add_term(&mut self, name: &str, sql: Option<&str>, features: BTreeSet<String>) {
        let value = sql.map_or_else(|| "CAST(NULL AS DOUBLE)".to_owned(), |s| format!("({s})"));
        self.relation = format!("SELECT t.*, {value} AS {name} FROM ({}) t", self.relation);
        self.term_features.insert(name.to_owned(), features);
    }
}

/// The shipped policy files, by file name.
const SHIPPED_POLICIES: [(&str, &str); 2] = [
    (
        "district-turnover-loan.toml",
        include_str!("../../../pipelines/policies/district-turnover-loan.toml"),
    ),
    (
        "daily-takings-line.toml",
        include_str!("../../../pipelines/policies/daily-takings-line.toml"),
    ),
];

/// DataFusion's planning errors carry a long schema dump; keep the first sentence.
fn plain(message: &str) -> String {
    let message = message
        .trim_start_matches("Error during planning: ")
        .trim_start_matches("Schema error: ");
    match message.find(". Valid fields are") {
        Some(end) => message[..end].to_owned(),
        None => message.to_owned(),
    }
}

/// SQL of the relation every expression is evaluated over: the feature rows of `table`
/// (optionally filtered) with one column per param.
pub(crate) fn compile_base_relation(
    params: &BTreeMap<String, ParamValue>,
    table: &str,
    filter: Option<&str>,
) -> String {
    let mut columns = vec!["m.*".to_owned()];
    columns.extend(
        params
            .iter()
            .map(|(name, value)| format!("{} AS {name}", value.sql())),
    );
    let filter = filter.map_or_else(String::new, |f| format!(" WHERE {f}"));
    format!("SELECT {} FROM {table} m{filter}", columns.join(", "))
}

impl Policy {
    /// Reads and checks a policy; `source_name` names it in errors.
    pub async fn parse(text: &str, source_name: &str) -> Result<Policy, PolicyErrors> {
        let mut problems = Vec::new();
        let mut problem = |location: &str, message: String| {
            problems.push(PolicyProblem {
                location: location.to_owned(),
                message,
            });
        };
        let fail = |problems: Vec<PolicyProblem>| PolicyErrors {
            source_name: source_name.to_owned(),
            problems,
        };
        let file: PolicyFile = match toml::from_str(text) {
            Ok(file) => file,
            Err(e) => {
                problem("file", format!("is not a valid policy: {}", e.message()));
                return Err(fail(problems));
            }
        };
        let features: BTreeSet<String> = MERCHANT_FEATURES
            .schema
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();

        // Product.
        let product = file.product.as_ref();
        let mut field = |name: &str, value: Option<&String>| -> String {
            match value.map(|v| v.trim()) {
                Some(v) if !v.is_empty() => v.to_owned(),
                _ => {
                    problem(&format!("product.{name}"), "is missing".to_owned());
                    String::new()
                }
            }
        };
        let product = Product {
            id: field("id", product.and_then(|p| p.id.as_ref())),
            name: field("name", product.and_then(|p| p.name.as_ref())),
            version: field("version", product.and_then(|p| p.version.as_ref())),
            description: product.map(|p| p.description.clone()).unwrap_or_default(),
        };

        // Params.
        let mut params = BTreeMap::new();
        let mut names: BTreeSet<String> = BTreeSet::new();
        for (name, value) in &file.params {
            let location = format!("params.{name}");
            names.insert(name.clone());
            if !is_name(name) {
                problem(
                    &location,
                    "names must be lower_snake_case (a–z, 0–9, _)".into(),
                );
                continue;
            }
            if features.contains(name) {
                problem(&location, "is a feature column name".into());
                continue;
            }
            match value {
                toml::Value::Integer(n) => {
                    params.insert(name.clone(), ParamValue::Integer(*n));
                }
                toml::Value::Float(x) if x.is_finite() => {
                    params.insert(name.clone(), ParamValue::Real(*x));
                }
                other => problem(
                    &location,
                    format!("must be a number, not {}", other.type_str()),
                ),
            }
        }

        let mut checker = match Checker::new(&params) {
            Ok(checker) => checker,
            Err(e) => {
                problem("file", format!("cannot be checked: {e}"));
                return Err(fail(problems));
            }
        };
        let mut codes: BTreeSet<String> = BTreeSet::from([LIMIT_BELOW_MINIMUM.to_owned()]);
        let mut check_code =
            |location: &str, code: Option<&String>, problems: &mut Vec<PolicyProblem>| match code
                .map(|c| c.trim())
            {
                None | Some("") => problems.push(PolicyProblem {
                    location: location.to_owned(),
                    message: "has no reason code (`code = \"…\"`)".into(),
                }),
                Some(c) if !is_code(c) => problems.push(PolicyProblem {
                    location: location.to_owned(),
                    message: format!("reason code {c:?} must be UPPER_SNAKE_CASE"),
                }),
                Some(c) if !codes.insert(c.to_owned()) => problems.push(PolicyProblem {
                    location: location.to_owned(),
                    message: format!("reason code {c} is used twice (or is reserved)"),
                }),
                Some(_) => {}
            };

        // Rules.
        let mut eligibility = Vec::new();
        let mut refer = Vec::new();
        for (section, rules, key) in [
            ("eligibility", &file.eligibility, "require"),
            ("refer", &file.refer, "when"),
        ] {
            for (i, rule) in rules.iter().enumerate() {
                let location = format!("{section}[{i}]");
                check_code(&location, rule.code.as_ref(), &mut problems);
                let (wanted, other) = if key == "require" {
                    (&rule.require, &rule.when)
                } else {
                    (&rule.when, &rule.require)
                };
                if other.is_some() {
                    let wrong = if key == "require" { "when" } else { "require" };
                    problems.push(PolicyProblem {
                        location: location.clone(),
                        message: format!("{section} rules use `{key}`, not `{wrong}`"),
                    });
                }
                let Some(sql) = wanted else {
                    problems.push(PolicyProblem {
                        location: location.clone(),
                        message: format!("has no `{key} = \"<SQL condition>\"`"),
                    });
                    continue;
                };
                match checker.check(sql, Expect::Boolean).await {
                    Ok(read) => {
                        let built = Rule {
                            code: rule.code.clone().unwrap_or_default(),
                            sql: sql.clone(),
                            explain: rule.explain.clone(),
                            features: read.into_iter().collect(),
                        };
                        if key == "require" {
                            eligibility.push(built);
                        } else {
                            refer.push(built);
                        }
                    }
                    Err(message) => problems.push(PolicyProblem {
                        location: format!("{location}.{key}"),
                        message,
                    }),
                }
            }
        }

        // Limit.
        let mut limit = LimitFormula {
            terms: Vec::new(),
            base: String::new(),
            caps: Vec::new(),
            round_down_fen: 1,
            minimum_fen: 0,
        };
        match &file.limit {
            None => problems.push(PolicyProblem {
                location: "limit".into(),
                message: "is missing (`[limit]` with `base = \"<SQL amount in fen>\"`)".into(),
            }),
            Some(file_limit) => {
                for (i, term) in file_limit.terms.iter().enumerate() {
                    let location = format!("limit.terms[{i}]");
                    let name = term.name.clone().unwrap_or_default();
                    if !is_name(&name) {
                        problems.push(PolicyProblem {
                            location: location.clone(),
                            message: format!(
                                "needs a lower_snake_case `name` (has {:?})",
                                term.name
                            ),
                        });
                    } else if features.contains(&name) || !names.insert(name.clone()) {
                        problems.push(PolicyProblem {
                            location: location.clone(),
                            message: format!("name {name} is already a feature, param or term"),
                        });
                    }
                    let Some(sql) = &term.sql else {
                        problems.push(PolicyProblem {
                            location,
                            message: "has no `sql`".into(),
                        });
                        if is_name(&name) {
                            checker.add_term(&name, None, BTreeSet::new());
                        }
                        continue;
                    };
                    let checked = checker.check(sql, Expect::Number).await;
                    if is_name(&name) {
                        match &checked {
                            Ok(read) => checker.add_term(&name, Some(sql), read.clone()),
                            Err(_) => checker.add_term(&name, None, BTreeSet::new()),
                        }
                    }
                    match checked {
                        Ok(_) => limit.terms.push(Term {
                            name,
                            sql: sql.clone(),
                        }),
                        Err(message) => problems.push(PolicyProblem {
                            location: format!("{location}.sql"),
                            message,
                        }),
                    }
                }
                match &file_limit.base {
                    None => problems.push(PolicyProblem {
                        location: "limit.base".into(),
                        message: "is missing".into(),
                    }),
                    Some(sql) => match checker.check(sql, Expect::Number).await {
                        Ok(_) => limit.base = sql.clone(),
                        Err(message) => problems.push(PolicyProblem {
                            location: "limit.base".into(),
                            message,
                        }),
                    },
                }
                for (i, cap) in file_limit.caps.iter().enumerate() {
                    let location = format!("limit.caps[{i}]");
                    check_code(&location, cap.code.as_ref(), &mut problems);
                    let Some(sql) = &cap.sql else {
                        problems.push(PolicyProblem {
                            location,
                            message: "has no `sql`".into(),
                        });
                        continue;
                    };
                    match checker.check(sql, Expect::Number).await {
                        Ok(_) => limit.caps.push(Cap {
                            code: cap.code.clone().unwrap_or_default(),
                            sql: sql.clone(),
                            explain: cap.explain.clone(),
                        }),
                        Err(message) => problems.push(PolicyProblem {
                            location: format!("{location}.sql"),
                            message,
                        }),
                    }
                }
                match file_limit.round_down_fen {
                    Some(n) if n >= 1 => limit.round_down_fen = n,
                    Some(n) => problems.push(PolicyProblem {
                        location: "limit.round_down_fen".into(),
                        message: format!("must be at least 1 fen (is {n})"),
                    }),
                    None => {}
                }
                match file_limit.minimum_fen {
                    Some(n) if n >= 0 => limit.minimum_fen = n,
                    Some(n) => problems.push(PolicyProblem {
                        location: "limit.minimum_fen".into(),
                        message: format!("must not be negative (is {n})"),
                    }),
                    None => {}
                }
            }
        }

        if !problems.is_empty() {
            return Err(fail(problems));
        }
        let digest = Sha256::digest(text.as_bytes());
        let content_hash = digest.iter().map(|b| format!("{b:02x}")).collect();
        Ok(Policy {
            product,
            params,
            eligibility,
            refer,
            limit,
            content_hash,
        })
    }

    /// Reads and checks a policy file.
    pub async fn load(path: &std::path::Path) -> Result<Policy, PolicyErrors> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| PolicyErrors {
            source_name: name.clone(),
            problems: vec![PolicyProblem {
                location: "file".into(),
                message: format!("cannot be read: {e}"),
            }],
        })?;
        Policy::parse(&text, &name).await
    }

    /// Reads and checks every `*.toml` policy of `dir`, keyed by product id (files in name
    /// order). A directory without policies, or two files for one product, is an error.
    pub async fn load_dir(dir: &std::path::Path) -> Result<BTreeMap<String, Policy>, PolicyErrors> {
        let about_dir = |message: String| PolicyErrors {
            source_name: dir.display().to_string(),
            problems: vec![PolicyProblem {
                location: "directory".into(),
                message,
            }],
        };
        let mut paths: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| about_dir(format!("cannot be read: {e}")))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
            .collect();
        paths.sort();
        let mut policies = BTreeMap::new();
        for path in paths {
            let policy = Policy::load(&path).await?;
            if let Some(previous) = policies.insert(policy.product.id.clone(), policy) {
                return Err(about_dir(format!(
                    "two policy files define product {} (the second is {})",
                    previous.product.id,
                    path.display()
                )));
            }
        }
        if policies.is_empty() {
            return Err(about_dir("holds no policy files (*.toml)".into()));
        }
        Ok(policies)
    }

    /// The policies shipped in `pipelines/policies`, compiled into the program (the demo
    /// and the report use them when no directory is given).
    pub async fn shipped() -> Result<Vec<Policy>, PolicyErrors> {
        let mut policies = Vec::with_capacity(SHIPPED_POLICIES.len());
        for (file, text) in SHIPPED_POLICIES {
            policies.push(Policy::parse(text, file).await?);
        }
        Ok(policies)
    }

    /// The reason codes this policy can emit, with their explanations.
    pub fn reason_codes(&self) -> Vec<(&str, &str)> {
        let mut codes: Vec<(&str, &str)> = self
            .eligibility
            .iter()
            .chain(&self.refer)
            .map(|r| (r.code.as_str(), r.explain.as_str()))
            .chain(
                self.limit
                    .caps
                    .iter()
                    .map(|c| (c.code.as_str(), c.explain.as_str())),
            )
            .collect();
        codes.push((
            LIMIT_BELOW_MINIMUM,
            "the computed limit is below the product's minimum",
        ));
        codes
    }

    /// Feature columns behind a reason code (empty for codes of the limit).
    pub fn features_of(&self, code: &str) -> &[String] {
        self.eligibility
            .iter()
            .chain(&self.refer)
            .find(|r| r.code == code)
            .map_or(&[], |r| r.features.as_slice())
    }
}
