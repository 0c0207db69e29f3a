// Plain Kotlin (no Android): manifest checks, Gemma chat format, stop handling, run statistics.
// Its JUnit tests read the shared vectors the Python side writes (mobile_demo/shared/test_vectors).
plugins {
    id("org.jetbrains.kotlin.jvm")
}

kotlin {
    jvmToolchain(17)
}

dependencies {
    testImplementation("junit:junit:4.13.2")
}

tasks.test {
    systemProperty("vectors", rootProject.file("../shared/test_vectors").absolutePath)
}
